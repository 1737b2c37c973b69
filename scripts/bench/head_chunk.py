"""Peak memory of one training step with the head and loss computed whole or in token chunks (--head_chunk), at
the World vocabulary (V = 65536) and ctx 4096, where the fp32 logits of one sample alone are 1 GiB.

    python -m scripts.bench.head_chunk [--ctx 4096 --head_chunk 512 --n_embd 256 --n_layer 1]

Same measurement as scripts/bench/long_context.py (fresh process per configuration, peak RSS growth).
"""
from __future__ import annotations

import argparse
import sys

from scripts.bench.long_context import run_child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--head_chunk", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=1)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65536)
    args = parser.parse_args(argv)
    plain = run_child(args, f"{args.ctx},0,0")
    chunked = run_child(args, f"{args.ctx},0,{args.head_chunk}")
    logits_mib = args.ctx * args.vocab * 4 / 2**20
    print(f"RWKV6 {args.n_layer} x {args.n_embd}, vocab {args.vocab}, ctx {args.ctx}, batch 1, fp32 CPU, one thread "
          f"(fp32 logits of the sample: {logits_mib:.0f} MiB)\n")
    print("| head | peak memory growth (MiB) | step time (s) |\n|---|---|---|")
    print(f"| whole | {plain['peak_mib']:.0f} | {plain['seconds']:.1f} |")
    memory, time = chunked["peak_mib"] / plain["peak_mib"], chunked["seconds"] / plain["seconds"]
    print(f"| --head_chunk {args.head_chunk} | {chunked['peak_mib']:.0f} ({memory:.2f}x) "
          f"| {chunked['seconds']:.1f} ({time:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
