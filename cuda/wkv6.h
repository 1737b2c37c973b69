// WKV6 kernel launchers shared by wkv6.cu (device code, CUDA headers only) and wkv6_op.cpp (torch binding).
//
// Layouts (all contiguous): r, k, v, w, y, gy, gr, gk, gv, gw: (B, T, H, N) with N = WKV6_HEAD_SIZE;
// w is the raw decay (d = exp(-exp(w))); u: (H, N); states s0, sT, gsT, gs0: (B, H, N, N) [key i, value j];
// gu: (B, H, N), summed over the batch by the caller. bf16 for per-step tensors except gw (fp32), fp32 otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#ifndef WKV6_HEAD_SIZE
#error "compile with -DWKV6_HEAD_SIZE=<head size>"
#endif

void wkv6_forward(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* k, const __nv_bfloat16* v,
                  const __nv_bfloat16* w, const float* u, const float* s0, __nv_bfloat16* y, float* sT,
                  cudaStream_t stream);

void wkv6_backward(int B, int T, int H, const __nv_bfloat16* r, const __nv_bfloat16* k, const __nv_bfloat16* v,
                   const __nv_bfloat16* w, const float* u, const float* s0, const __nv_bfloat16* gy,
                   const float* gsT, __nv_bfloat16* gr, __nv_bfloat16* gk, __nv_bfloat16* gv, float* gw,
                   float* gu, float* gs0, cudaStream_t stream);
