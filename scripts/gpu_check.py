"""One-command GPU check of the trainer on one CUDA GPU (H100/H200: under 8 minutes), written as a markdown report.

    bash scripts/gpu_check.sh [--out docs/gpu_check.md]      # the real check, needs a CUDA GPU
    bash scripts/gpu_check.sh --dry-run [--out FILE]          # CPU, tiny sizes: keeps the check from rotting
    python -m scripts.gpu_check --sections compare,deepspeed  # a subset

Sections (src/diagnostics/sections.py), each in its own process with its own time box: environment, build (the
CUDA WKV6 kernel), compare (cuda/fla against the fp32 torch backend: outputs and every gradient), deepspeed (one
ZeRO-2 bf16 Bone-row step of the 1.6B preset through train.py at RWKV6-1.6B shapes), train (LoRA vs Bone at the
Bone paper's Table 7 setting, beside the paper's numbers), timing (WKV backends). --dry-run runs them on the CPU
at tiny sizes with stand-ins (the report says which); exit status 0 when no section failed.

CUDA build settings: when unset, CUDA_HOME is pointed at the real toolkit root (the `nvcc` on PATH may be a
wrapper script) and TORCH_CUDA_ARCH_LIST at the GPU's compute capability (nvidia-smi), else "9.0".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from src.atomic import atomic_write_text
from src.diagnostics.gpu_check import DEFAULT_BUDGET, SECTIONS, failed, render_report, run_check
from src.diagnostics.sections import CheckContext
from src.training.cuda_env import cuda_build_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, torch backend standing in")
    ap.add_argument("--out", default=None, help="markdown report (default docs/gpu_check.md, "
                                                "docs/gpu_check_dry_run.md with --dry-run)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help="seconds for the whole check (each section is also time-boxed); sections left when it runs "
                         "out are skipped")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    args = ap.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out or ("docs/gpu_check_dry_run.md" if args.dry_run else "docs/gpu_check.md"))
    env = cuda_build_env(os.environ)
    ctx = CheckContext(dry_run=args.dry_run, env=env, python=sys.executable)
    results, took = run_check(chosen, ctx, args.budget, progress=lambda name, r: print(
        f"[gpu_check] {name}: {r.status} ({r.seconds:.1f} s) {r.summary}", flush=True))
    atomic_write_text(out, render_report(results, args.dry_run, env, took))
    print(f"[gpu_check] report: {out}")
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
