"""Benchmark full training steps (forward + backward + AdamW step) of an RWKV6 with Bone-row, Bone-col and
LoRA at equal trainable parameters (b=64, r=32), with and without gradient checkpointing.

    python -m scripts.bench.train_step [--n_layer 2 --n_embd 512 --ctx 512 --vocab 4096 --steps 10]
    python -m scripts.bench.train_step --quick            # smoke run: tiny model, two steps
    python -m scripts.bench.train_step --device cuda --dtype bf16 --n_layer 24 --n_embd 2048 --vocab 65536

Speed: per grad_cp setting, one fresh process builds every method's model and times their steps side by side,
round-robin (order reversed every other round), median step time. Memory: every configuration in a fresh
process of its own; on CPU "peak live added" (RSS growth with glibc's mmap threshold fixed at 64 KiB, so RSS
follows live tensors) beside the default allocator's RSS growth; on CUDA max allocated/reserved. The measuring
code and its notes are in src/diagnostics/train_step.py. Prints a markdown table of ratios to LoRA with the same
grad_cp, the goal lines (Bone-row >= 0.95x LoRA's tokens/s at <= 1.02x its memory) and how much the machine's
noise moves the speed ratio, all from this one run.
"""
from __future__ import annotations

import argparse
import os
import sys

from src.diagnostics import train_step as ts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--b", type=int, default=64, help="Bone block size")
    ap.add_argument("--r", type=int, default=32, help="LoRA rank (r = b/2 gives equal parameters on RWKV6)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration (round-robin rounds)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default=",".join(ts.METHODS))
    ap.add_argument("--grad_cp", default="0,1", help="comma-separated 0/1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--wkv_backend", default="torch")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each measuring process")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2x256 model, ctx 64, two steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_layer, args.n_embd, args.vocab, args.ctx, args.steps, args.warmup = 2, 256, 512, 64, 2, 1
    base = ts.StepSpec(method="lora", grad_cp=False, n_layer=args.n_layer, n_embd=args.n_embd, vocab=args.vocab,
                    ctx=args.ctx, batch=args.batch, b=args.b, r=args.r, steps=args.steps, warmup=args.warmup,
                    device=args.device, dtype=args.dtype, wkv_backend=args.wkv_backend, threads=args.threads)
    methods = args.methods.split(",")
    for m in methods:
        ts.adapter_config(m, args.b, args.r)  # fail fast on a typo
    grad_cps = [bool(int(c)) for c in args.grad_cp.split(",")]
    print(f"RWKV6 {args.n_layer}x{args.n_embd}, vocab {args.vocab}, batch {args.batch} x ctx {args.ctx}, "
          f"{args.dtype} on {args.device}, wkv {args.wkv_backend}, b={args.b}, r={args.r}, {args.threads} thread(s), "
          f"methods side by side: median of {args.steps} round-robin steps after {args.warmup} warm-up\n", flush=True)
    results = ts.run_all(base, methods, grad_cps, os.environ, timeout=args.timeout)
    memory = ts.memory_columns(args.device)
    print(ts.ratio_table(results, memory))
    print()
    for line in ts.goal_lines(results, memory[0][0]) + ts.noise_lines(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
