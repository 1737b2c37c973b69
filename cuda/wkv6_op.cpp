// Torch binding of the WKV6 kernels: checks inputs, allocates outputs and registers the ops
// rwkv6bone_h<N>::forward / ::backward (one namespace per compiled head size N).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "wkv6.h"

namespace {

constexpr int64_t kHeadSize = WKV6_HEAD_SIZE;

void check_input(const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    TORCH_CHECK(x.is_cuda(), "wkv6: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == dtype, "wkv6: ", name, " must be ", dtype, ", got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv6: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == shape, "wkv6: ", name, " must have shape ", shape, ", got ", x.sizes());
}

const __nv_bfloat16* bf16_ptr(const at::Tensor& x) {
    return reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>());
}

__nv_bfloat16* bf16_ptr_mut(at::Tensor& x) { return reinterpret_cast<__nv_bfloat16*>(x.data_ptr<at::BFloat16>()); }

void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                  const at::Tensor& u, const at::Tensor& s0) {
    TORCH_CHECK(r.dim() == 4, "wkv6: r must be (B, T, H, N), got ", r.sizes());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(r.size(3) == kHeadSize, "wkv6: this build is for head size ", kHeadSize, ", got ", r.size(3));
    TORCH_CHECK(T >= 1, "wkv6: T must be >= 1");
    const std::vector<int64_t> step_shape{B, T, H, kHeadSize};
    check_input(r, "r", at::kBFloat16, step_shape);
    check_input(k, "k", at::kBFloat16, step_shape);
    check_input(v, "v", at::kBFloat16, step_shape);
    check_input(w, "w", at::kBFloat16, step_shape);
    check_input(u, "u", at::kFloat, {H, kHeadSize});
    check_input(s0, "s0", at::kFloat, {B, H, kHeadSize, kHeadSize});
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& w, const at::Tensor& u, const at::Tensor& s0) {
    check_inputs(r, k, v, w, u, s0);
    const c10::cuda::CUDAGuard guard(r.device());
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    at::Tensor y = at::empty_like(r);
    at::Tensor sT = at::empty_like(s0);
    wkv6_forward(B, T, H, bf16_ptr(r), bf16_ptr(k), bf16_ptr(v), bf16_ptr(w), u.data_ptr<float>(),
                 s0.data_ptr<float>(), bf16_ptr_mut(y), sT.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, sT};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& s0, const at::Tensor& gy, const at::Tensor& gsT) {
    check_inputs(r, k, v, w, u, s0);
    check_input(gy, "gy", at::kBFloat16, r.sizes());
    check_input(gsT, "gsT", at::kFloat, s0.sizes());
    const c10::cuda::CUDAGuard guard(r.device());
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    at::Tensor gr = at::empty_like(r);
    at::Tensor gk = at::empty_like(r);
    at::Tensor gv = at::empty_like(r);
    at::Tensor gw = at::empty(r.sizes(), r.options().dtype(at::kFloat));
    at::Tensor gu = at::empty({B, H, kHeadSize}, u.options());
    at::Tensor gs0 = at::empty_like(s0);
    wkv6_backward(B, T, H, bf16_ptr(r), bf16_ptr(k), bf16_ptr(v), bf16_ptr(w), u.data_ptr<float>(),
                  s0.data_ptr<float>(), bf16_ptr(gy), gsT.data_ptr<float>(), bf16_ptr_mut(gr), bf16_ptr_mut(gk),
                  bf16_ptr_mut(gv), gw.data_ptr<float>(), gu.data_ptr<float>(), gs0.data_ptr<float>(),
                  c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {gr, gk, gv, gw, gu, gs0};
}

}  // namespace

// The namespace carries the head size so builds for several head sizes can live in one process.
#define WKV6_CONCAT_(a, b) a##b
#define WKV6_CONCAT(a, b) WKV6_CONCAT_(a, b)
#define WKV6_NAMESPACE WKV6_CONCAT(rwkv6bone_h, WKV6_HEAD_SIZE)
#define WKV6_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define WKV6_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

WKV6_LIBRARY(WKV6_NAMESPACE, m) {
    m.def("forward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0) -> (Tensor, Tensor)");
    m.def(
        "backward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0, Tensor gy, Tensor gsT)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

WKV6_LIBRARY_IMPL(WKV6_NAMESPACE, CUDA, m) {
    m.impl("forward", &forward);
    m.impl("backward", &backward);
}
