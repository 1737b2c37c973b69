"""Benchmark the torch WKV6 backend against the naive per-step loop: forward + backward on CPU.

    python -m scripts.bench.wkv                      # B=1, T=1024, H=32, N=64, one thread
    python -m scripts.bench.wkv --time 256 --heads 8 # smaller

Both run once (after a warm-up at T=min(T, 64)) on the same float32 inputs; prints each time, the
ratio, and the relative difference of their outputs and gradients as a sanity check.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from src.wkv import wkv6


def naive_wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (inputs unbound once, so autograd stays linear in T)."""
    S = state
    ys = []
    for r_t, k_t, v_t, w_t in zip(r.unbind(1), k.unbind(1), v.unbind(1), w.unbind(1), strict=True):  # each (B, H, N)
        kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, N, N)
        ys.append(torch.einsum("bhi,bhij->bhj", r_t, S + u.unsqueeze(-1) * kv))
        S = torch.exp(-torch.exp(w_t)).unsqueeze(-1) * S + kv
    return torch.stack(ys, 1), S


def torch_backend(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    return wkv6(r, k, v, w, u, state, backend="torch")


def make_inputs(B: int, T: int, H: int, N: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.empty(B, T, H, N).uniform_(-8.0, 3.0, generator=g)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g)
    return [r, k, v, w, u, state]


def fwd_bwd(fn, inputs: list[Tensor]) -> tuple[float, float, list[Tensor]]:
    """Seconds for forward and for backward of y.sum() + state.sum(); returns [y, state, grads...]."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    start = time.perf_counter()
    y, s = fn(*leaves)
    mid = time.perf_counter()
    (y.sum() + s.sum()).backward()
    end = time.perf_counter()
    return mid - start, end - mid, [y.detach(), s.detach()] + [x.grad for x in leaves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--time", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    B, T, H, N = args.batch, args.time, args.heads, args.head_size
    print(f"WKV6 fwd+bwd on CPU, B={B} T={T} H={H} N={N}, {args.threads} thread(s), float32")
    warm = make_inputs(B, min(T, 64), H, N, args.seed)  # same chunk length as the real run
    fwd_bwd(naive_wkv6, warm)
    fwd_bwd(torch_backend, warm)

    inputs = make_inputs(B, T, H, N, args.seed)
    naive_f, naive_b, naive_out = fwd_bwd(naive_wkv6, inputs)
    chunk_f, chunk_b, chunk_out = fwd_bwd(torch_backend, inputs)
    for name, f, b in (("naive loop   ", naive_f, naive_b), ("torch backend", chunk_f, chunk_b)):
        print(f"{name}: fwd {f * 1e3:9.1f} ms  bwd {b * 1e3:9.1f} ms  total {(f + b) * 1e3:9.1f} ms")
    print(f"speed-up (fwd+bwd): {(naive_f + naive_b) / (chunk_f + chunk_b):.1f}x")
    names = ["y", "state", "dr", "dk", "dv", "dw", "du", "dstate"]
    diffs = [((a - b).norm() / b.norm()).item() for a, b in zip(chunk_out, naive_out, strict=True)]
    print("relative difference:", "  ".join(f"{n} {d:.1e}" for n, d in zip(names, diffs, strict=True)))


if __name__ == "__main__":
    main()
