"""Benchmark Bone against LoRA at equal parameters: forward+backward time and bytes saved for backward.

    python -m scripts.bench.bone [--T 4096] [--dtypes fp32,bf16] [--threads 1] [--repeats 5] [--quick]
    python -m scripts.bench.bone --cases stack --dtypes fp32 --methods lora,bone-row   # the block goal only

CPU bf16 note: without AVX512-BF16/AMX, torch emulates bf16 matmuls, and the dy·W layout every backward
uses is ~35x slower than x·Wᵀ, so bf16 at T=4096 takes hours there; use e.g. --dtypes bf16 --T 128.

Cases at the RWKV6-1.6B shapes: single layers 2048->2048, 2048->7168, 7168->2048, and an 8-layer stack
(one RWKV6 block's projections chained: att receptance/key/value/gate/output, ffn key, value, receptance).
Methods: naive Bone (W' built with autograd), Bone-row (factored Function), Bone-col (rebuild Function) with
b=64, and LoRA r=32 (equal parameters over a block). Inputs and base weights are in the given dtype,
adapter parameters fp32 (as injected). Saved bytes are counted with saved_tensors_hooks, deduplicated by
storage, excluding parameter storages. Time: the methods run side by side, one fwd+bwd each per round, the
order reversed every other round, for --repeats rounds; the median is reported (wall clock; the median
process CPU time gives a second ratio that other jobs on the machine disturb less). One thread by default.
Prints a markdown table with ratios to LoRA and the 8-layer stack's goal line (Bone-row >= 0.97x LoRA's speed).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.adapters.bone import BoneLinear, bone_merged
from src.adapters.config import AdapterConfig
from src.adapters.lora import LoRALinear

C, FFN = 2048, 7168
LAYER_CASES = {"2048->2048": [(C, C)], "2048->7168": [(C, FFN)], "7168->2048": [(FFN, C)]}
STACK = [(C, C)] * 5 + [(C, FFN), (FFN, C), (C, C)]  # (in, out) of one block's projections, chained
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NaiveBone(nn.Module):
    """Bone as commonly written: build W' = W + W·bone + bone with autograd, then F.linear."""

    def __init__(self, weight: nn.Parameter, b: int):
        super().__init__()
        self.weight = weight
        self.bone = nn.Parameter(torch.zeros(weight.shape[1] // b, b, b))

    def forward(self, x: Tensor) -> Tensor:
        merged = bone_merged(self.weight, {"bone": self.bone.to(self.weight.dtype)}, "bone", "row")
        return F.linear(x, merged)


def build(method: str, dims: list[tuple[int, int]], dtype: torch.dtype, b: int, r: int) -> nn.Sequential:
    layers = []
    for in_f, out_f in dims:
        weight = nn.Parameter((torch.randn(out_f, in_f) * in_f**-0.5).to(dtype), requires_grad=False)
        if method == "naive":
            layers.append(NaiveBone(weight, b))
        elif method in ("bone-row", "bone-col"):
            layers.append(BoneLinear(weight, AdapterConfig(method="bone", b=b, grouping=method[5:])))
        else:
            layer = LoRALinear(weight, AdapterConfig(method="lora", lora_r=r, lora_alpha=r))
            layer.initialize()
            layers.append(layer)
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("lora_A"):
                p.normal_(std=0.01)
    return model


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd keeps from forward to backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def step_time(model: nn.Module, x: Tensor, dy: Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds of one forward+backward."""
    cpu, wall = time.process_time(), time.perf_counter()
    model(x).backward(dy)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for p in model.parameters():
        p.grad = None
    x.grad = None
    return wall, cpu


def bench_case(dims: list[tuple[int, int]], dtype: torch.dtype, T: int, b: int, r: int, repeats: int,
               methods: list[str]) -> dict[str, tuple[float, float, int, int]]:
    """{method: (median wall seconds, median CPU seconds, saved bytes, trainable parameters)}."""
    models = {m: build(m, dims, dtype, b, r) for m in methods}
    x = torch.randn(T, dims[0][0], dtype=dtype, requires_grad=True)  # an activation: its gradient is needed
    dy = torch.randn(T, dims[-1][1], dtype=dtype)
    small = min(T, 64)
    for m in methods:  # warm up kernels and allocator at a small size, then once at full size
        step_time(models[m], x[:small], dy[:small])
        step_time(models[m], x, dy)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for rnd in range(repeats):
        for m in (methods if rnd % 2 == 0 else methods[::-1]):
            times[m].append(step_time(models[m], x, dy))
    return {m: (statistics.median(t[0] for t in times[m]), statistics.median(t[1] for t in times[m]),
                saved_bytes(models[m], x), sum(p.numel() for p in models[m].parameters() if p.requires_grad))
            for m in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4096, help="tokens per step (batch x context)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--cases", default="layers,stack", help="comma-separated: layers, stack")
    parser.add_argument("--methods", default="lora,naive,bone-row,bone-col", help="comma-separated, lora first")
    parser.add_argument("--b", type=int, default=64)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke test: T=128, one repeat, fp32 only")
    args = parser.parse_args()
    if args.quick:
        args.T, args.repeats, args.dtypes = 128, 1, "fp32"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = args.methods.split(",")
    if methods[0] != "lora":
        parser.error("--methods must start with lora (ratios are to LoRA)")
    cases: dict[str, list[tuple[int, int]]] = {}
    if "layers" in args.cases.split(","):
        cases.update(LAYER_CASES)
    if "stack" in args.cases.split(","):
        cases["8-layer stack"] = STACK
    print(f"T={args.T}, b={args.b}, LoRA r={args.r}, threads={args.threads}, median of {args.repeats} interleaved "
          f"rounds, torch {torch.__version__}\n")
    print("| case | dtype | method | params | fwd+bwd ms | saved MB | speed vs LoRA | per CPU-s vs LoRA "
          "| saved vs LoRA |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    goals = []
    for dtype_name in args.dtypes.split(","):
        for case, dims in cases.items():
            results = bench_case(dims, DTYPES[dtype_name], args.T, args.b, args.r, args.repeats, methods)
            lora_t, lora_cpu, lora_saved, _ = results["lora"]
            for m in methods:
                t, cpu, saved, params = results[m]
                print(f"| {case} | {dtype_name} | {m} | {params:,} | {t * 1e3:.0f} | {saved / 2**20:.1f} | "
                      f"{lora_t / t:.3f}x | {lora_cpu / cpu:.3f}x | {saved / lora_saved:.2f}x |", flush=True)
            if case == "8-layer stack" and "bone-row" in results:
                t, cpu, saved, _ = results["bone-row"]
                ok = lora_t / t >= 0.97 and saved <= 1.02 * lora_saved
                goals.append(f"{dtype_name} 8-layer stack: Bone-row {lora_t / t:.3f}x LoRA's speed "
                             f"({lora_cpu / cpu:.3f}x per CPU-second) at {saved / lora_saved:.3f}x its saved bytes -> "
                             f"{'meets' if ok else 'MISSES'} the goal (>= 0.97x speed, <= 1.02x saved)")
    print("\n".join(["", *goals]))


if __name__ == "__main__":
    main()
