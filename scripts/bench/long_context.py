"""Peak memory of one training step (forward + backward) against ctx_len, with and without --chunk_ctx.

    python -m scripts.bench.long_context [--ctx 1024 4096 16384] [--chunk 1024] [--n_layer 4 --n_embd 512]

Each configuration runs in a fresh process; the figure is the growth of the process's peak resident memory
during the step (ru_maxrss after the step minus before it), so the weights are not counted. CPU, fp32. The
children run with MALLOC_MMAP_THRESHOLD_=65536: glibc's default (a threshold that rises as large blocks are
freed) lets its heap grow with every chunk's freed activations, which measures the allocator, not what the
step holds (GPU caching allocators reuse freed blocks).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(n_layer: int, n_embd: int, vocab: int, ctx: int, chunk: int, head_chunk: int = 0) -> dict[str, float]:
    """One step in this process: {"peak_mib": growth of peak RSS, "seconds": wall time}."""
    import torch

    from src.model import RWKV6, RWKV6Config
    from src.training.sequence import sequence_loss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = RWKV6(RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, wkv_backend="torch"))
    model.init_weights(seed=0)
    idx = torch.randint(0, vocab, (1, ctx + 1))
    mask = torch.ones(1, ctx)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = sequence_loss(model, idx[:, :-1], idx[:, 1:], mask, scale=1 / ctx, l2wrap=True, chunk_ctx=chunk,
                        head_chunk=head_chunk)
    out.objective.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"peak_mib": peak / 1024, "seconds": seconds}


def run_child(args: argparse.Namespace, one: str) -> dict[str, float]:
    """measure() in a fresh process (see the module docstring for the allocator setting)."""
    cmd = [sys.executable, "-m", "scripts.bench.long_context", "--one", one, "--n_layer", str(args.n_layer),
           "--n_embd", str(args.n_embd), "--vocab", str(args.vocab)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)  # child: "ctx,chunk[,head_chunk]"
    args = parser.parse_args(argv)
    if args.one:
        ctx, chunk, *head = (int(v) for v in args.one.split(","))
        print(json.dumps(measure(args.n_layer, args.n_embd, args.vocab, ctx, chunk, *head)))
        return 0
    rows = {(ctx, chunk): run_child(args, f"{ctx},{chunk}") for ctx in args.ctx for chunk in (0, args.chunk)}
    base = args.ctx[0]
    print(f"RWKV6 {args.n_layer} x {args.n_embd}, vocab {args.vocab}, batch 1, fp32 CPU, one thread; peak memory "
          f"growth of one forward+backward (MiB) and its ratio to ctx_len {base}")
    print(f"\n| ctx_len | no chunking | --chunk_ctx {args.chunk} | chunked / unchunked |")
    print("|---|---|---|---|")
    for ctx in args.ctx:
        plain, chunked = rows[(ctx, 0)]["peak_mib"], rows[(ctx, args.chunk)]["peak_mib"]
        print(f"| {ctx} | {plain:.0f} ({plain / rows[(base, 0)]['peak_mib']:.2f}x) | "
              f"{chunked:.0f} ({chunked / rows[(base, args.chunk)]['peak_mib']:.2f}x) | {chunked / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
