// WKV6 forward and backward kernels: bf16 inputs, fp32 state and accumulation.
//
// One block per (batch, head), N = WKV6_HEAD_SIZE threads; a thread keeps one row or one column of the
// N x N state (or of its gradient) in registers and walks the sequence step by step. Each step's
// per-channel vectors are staged in shared memory. T is a runtime argument: nothing is sized by T.
//
// Recurrence (i = key channel, j = value channel, d_t = exp(-exp(w_t))):
//   y_t[j]  = sum_i r_t[i] (S_{t-1}[i,j] + u[i] k_t[i] v_t[j])
//   S_t     = diag(d_t) S_{t-1} + k_t v_t^T
// Backward, with G_t = dL/dS_t (G_{T-1} = gsT) and G_{t-1} = diag(d_t) G_t + r_t gy_t^T:
//   gr_t[i] = sum_j S_{t-1}[i,j] gy_t[j] + u[i] k_t[i] (v_t . gy_t)
//   gk_t[i] = sum_j G_t[i,j] v_t[j]      + u[i] r_t[i] (v_t . gy_t)
//   gv_t[j] = sum_i k_t[i] G_t[i,j]      + gy_t[j] sum_i u[i] r_t[i] k_t[i]
//   gu[i]   = sum_t r_t[i] k_t[i] (v_t . gy_t)
//   dL/dlog d_t[i] = d_t[i] sum_j S_{t-1}[i,j] G_t[i,j]
//                  = sum_{tau > t} Q_tau[i] - sum_{s >= t} P_s[i]
//     with Q_tau = r_tau * (S_{tau-1} gy_tau) for tau < T, Q_T = rowsum(S_{T-1} * gsT), P_s = k_s * (G_s v_s):
//     every (write at s, read at tau) pair the decay of step t lies between. This needs no stored states.
#include "wkv6.h"

namespace {

constexpr int N = WKV6_HEAD_SIZE;
// exp(-exp(7)) is 0 in fp32, and so is its w-derivative: raw decays are clamped here (as in the torch
// backend) so exp(w) stays finite and the w-gradient above it is exactly 0.
constexpr float kRawDecayMax = 7.f;

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf16(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ float raw_decay(__nv_bfloat16 w) { return fminf(__bfloat162float(w), kRawDecayMax); }

// Offset of element (b, t, h, n) of a (B, T, H, N) tensor.
__device__ __forceinline__ size_t step_offset(int b, int t, int h, int n, int T, int H) {
    return ((static_cast<size_t>(b) * T + t) * H + h) * N + n;
}

__global__ void __launch_bounds__(N) forward_kernel(int T, int H, const __nv_bfloat16* __restrict__ r,
                                                    const __nv_bfloat16* __restrict__ k,
                                                    const __nv_bfloat16* __restrict__ v,
                                                    const __nv_bfloat16* __restrict__ w, const float* __restrict__ u,
                                                    const float* __restrict__ s0, __nv_bfloat16* __restrict__ y,
                                                    float* __restrict__ sT) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;  // this thread owns state column j
    __shared__ float r_s[N], k_s[N], d_s[N], u_s[N];
    const size_t state_base = static_cast<size_t>(blockIdx.x) * N * N;

    float state[N];  // state[i] = S[i][j]
#pragma unroll
    for (int i = 0; i < N; ++i) state[i] = s0[state_base + i * N + j];
    u_s[j] = u[h * N + j];

    for (int t = 0; t < T; ++t) {
        const size_t at = step_offset(b, t, h, j, T, H);
        __syncthreads();  // everyone is done reading the previous step
        r_s[j] = to_float(r[at]);
        k_s[j] = to_float(k[at]);
        d_s[j] = __expf(-__expf(raw_decay(w[at])));
        const float v_j = to_float(v[at]);
        __syncthreads();

        float out = 0.f, bonus = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            out += r_s[i] * state[i];
            bonus += r_s[i] * u_s[i] * k_s[i];
            state[i] = d_s[i] * state[i] + k_s[i] * v_j;
        }
        y[at] = to_bf16(out + bonus * v_j);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) sT[state_base + i * N + j] = state[i];
}

__global__ void __launch_bounds__(N) backward_kernel(int T, int H, const __nv_bfloat16* __restrict__ r,
                                                     const __nv_bfloat16* __restrict__ k,
                                                     const __nv_bfloat16* __restrict__ v,
                                                     const __nv_bfloat16* __restrict__ w,
                                                     const float* __restrict__ u, const float* __restrict__ s0,
                                                     const __nv_bfloat16* __restrict__ gy,
                                                     const float* __restrict__ gsT, __nv_bfloat16* __restrict__ gr,
                                                     __nv_bfloat16* __restrict__ gk, __nv_bfloat16* __restrict__ gv,
                                                     float* __restrict__ gw, float* __restrict__ gu,
                                                     float* __restrict__ gs0) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, c = threadIdx.x;  // channel c: key i in phases 1-2, value j in 3
    __shared__ float v_s[N], gy_s[N], r_s[N], k_s[N], d_s[N], u_s[N];
    const size_t state_base = static_cast<size_t>(blockIdx.x) * N * N;
    const float u_c = u[h * N + c];
    u_s[c] = u_c;

    // Phase 1, forward in time; this thread owns state row i = c. Writes gr, Q_t (into gw), gu.
    float row[N];
#pragma unroll
    for (int j = 0; j < N; ++j) row[j] = s0[state_base + c * N + j];
    float gu_c = 0.f;
    for (int t = 0; t < T; ++t) {
        const size_t at = step_offset(b, t, h, c, T, H);
        __syncthreads();
        v_s[c] = to_float(v[at]);
        gy_s[c] = to_float(gy[at]);
        const float r_c = to_float(r[at]), k_c = to_float(k[at]);
        const float d_c = __expf(-__expf(raw_decay(w[at])));
        __syncthreads();

        float s_gy = 0.f, v_gy = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            s_gy += row[j] * gy_s[j];
            v_gy += v_s[j] * gy_s[j];
            row[j] = d_c * row[j] + k_c * v_s[j];
        }
        gr[at] = to_bf16(s_gy + u_c * k_c * v_gy);
        gw[at] = r_c * s_gy;  // Q_t, consumed by phase 2 of this same thread
        gu_c += r_c * k_c * v_gy;
    }
    gu[static_cast<size_t>(blockIdx.x) * N + c] = gu_c;
    float q_next = 0.f;  // Q_T
#pragma unroll
    for (int j = 0; j < N; ++j) q_next += row[j] * gsT[state_base + c * N + j];

    // Phase 2, backward in time; this thread owns gradient row i = c. Writes gk and gw.
#pragma unroll
    for (int j = 0; j < N; ++j) row[j] = gsT[state_base + c * N + j];
    float glogd = 0.f;
    for (int t = T - 1; t >= 0; --t) {
        const size_t at = step_offset(b, t, h, c, T, H);
        __syncthreads();
        v_s[c] = to_float(v[at]);
        gy_s[c] = to_float(gy[at]);
        const float r_c = to_float(r[at]), k_c = to_float(k[at]);
        const float w_raw = raw_decay(w[at]);
        const float w_exp = __expf(w_raw);
        const float d_c = __expf(-w_exp);
        __syncthreads();

        float g_v = 0.f, v_gy = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            g_v += row[j] * v_s[j];
            v_gy += v_s[j] * gy_s[j];
            row[j] = d_c * row[j] + r_c * gy_s[j];
        }
        gk[at] = to_bf16(g_v + u_c * r_c * v_gy);
        glogd += q_next - k_c * g_v;  // now dL/dlog d_t
        q_next = gw[at];              // Q_t, for step t - 1
        gw[at] = w_raw < kRawDecayMax ? -w_exp * glogd : 0.f;  // dlog d / dw = -exp(w)
    }

    // Phase 3, backward in time; this thread owns gradient column j = c. Writes gv and gs0.
    float col[N];
#pragma unroll
    for (int i = 0; i < N; ++i) col[i] = gsT[state_base + i * N + c];
    for (int t = T - 1; t >= 0; --t) {
        const size_t at = step_offset(b, t, h, c, T, H);
        __syncthreads();
        r_s[c] = to_float(r[at]);
        k_s[c] = to_float(k[at]);
        d_s[c] = __expf(-__expf(raw_decay(w[at])));
        const float gy_c = to_float(gy[at]);
        __syncthreads();

        float k_g = 0.f, bonus = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            k_g += k_s[i] * col[i];
            bonus += u_s[i] * r_s[i] * k_s[i];
            col[i] = d_s[i] * col[i] + r_s[i] * gy_c;
        }
        gv[at] = to_bf16(k_g + gy_c * bonus);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) gs0[state_base + i * N + c] = col[i];
}

}  // namespace

void wkv6_forward(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* k, const __nv_bfloat16* v,
                  const __nv_bfloat16* w, const float* u, const float* s0, __nv_bfloat16* y, float* sT,
                  cudaStream_t stream) {
    forward_kernel<<<B * H, N, 0, stream>>>(T, H, r, k, v, w, u, s0, y, sT);
}

void wkv6_backward(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* k, const __nv_bfloat16* v,
                   const __nv_bfloat16* w, const float* u, const float* s0, const __nv_bfloat16* gy,
                   const float* gsT, __nv_bfloat16* gr, __nv_bfloat16* gk, __nv_bfloat16* gv, float* gw,
                   float* gu, float* gs0, cudaStream_t stream) {
    backward_kernel<<<B * H, N, 0, stream>>>(T, H, r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0);
}
