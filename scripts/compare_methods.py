"""Compare PEFT methods on the demo's tiny RWKV6 base: identical data order, steps and learning rate
(src.diagnostics.compare.py says what runs and what is written).

    python -m scripts.compare_methods [--steps 120 --epochs 3 --b 32 --seeds 0 --out docs]
    python -m scripts.compare_methods --micro --work /tmp/cmp --out /tmp/cmp/out      # 2-step plumbing check

Writes comparison_train_loss.png, comparison_val_loss.png, comparison_table.md and comparison_results.json to
--out; one proj_dir per method and seed under --work (a finished run of the same command is reused).
"""
from __future__ import annotations

import argparse
import os
import sys

from src.diagnostics.compare import CompareSettings, Comparison
from src.errors import RWKVBoneError

DEFAULTS = CompareSettings()


def parse_args(argv: list[str] | None) -> CompareSettings:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULTS.out, help="folder for the figures, table and raw results")
    ap.add_argument("--work", default=None, help="folder for the runs, one proj_dir per method and seed "
                                                 "(default runs/compare, runs/compare_micro with --micro)")
    ap.add_argument("--base", default=DEFAULTS.base, help="base checkpoint (pretrained with the demo's command if "
                                                          "missing)")
    ap.add_argument("--data_dir", default=DEFAULTS.data_dir, help="demo data folder (generated if missing)")
    ap.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps per method (all epochs)")
    ap.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                    help="epochs over the training subset (one val point each)")
    ap.add_argument("--b", type=int, default=DEFAULTS.b,
                    help="Bone block size; LoRA/PiSSA use r = b/2 (equal parameters)")
    ap.add_argument("--lr", type=float, default=DEFAULTS.lr, help="initial learning rate, the same for every method")
    ap.add_argument("--lr_final_ratio", type=float, default=DEFAULTS.lr_final_ratio,
                    help="final lr / initial lr (cosine)")
    ap.add_argument("--micro_bsz", type=int, default=DEFAULTS.micro_bsz)
    ap.add_argument("--ctx_len", type=int, default=DEFAULTS.ctx_len, help="the demo problems are at most 38 tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULTS.seeds))
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    ap.add_argument("--val_problems", type=int, default=DEFAULTS.val_problems)
    ap.add_argument("--eval_problems", type=int, default=DEFAULTS.eval_problems,
                    help="test problems scored by exact match")
    ap.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens)
    ap.add_argument("--jobs", type=int, default=DEFAULTS.jobs,
                    help="train.py runs at a time (wall time and memory are then shared)")
    ap.add_argument("--timeout", type=float, default=DEFAULTS.timeout, help="seconds per train.py run")
    ap.add_argument("--threads", type=int, default=DEFAULTS.threads,
                    help="torch CPU threads per train.py run and for evaluation (OMP_NUM_THREADS); 1 keeps runs "
                         "comparable on a shared machine, where a busy core stalls every multi-threaded step")
    ap.add_argument("--micro", action="store_true", help="plumbing check: a random 2 x 128 base built on the fly, "
                                                         "2 steps, 1 epoch, 2 problems scored")
    args = vars(ap.parse_args(argv))
    micro = args.pop("micro")
    args["work"] = args["work"] or ("runs/compare_micro" if micro else DEFAULTS.work)
    args["seeds"] = tuple(args["seeds"])
    args["methods"] = tuple(args["methods"]) if args["methods"] else None
    settings = CompareSettings(**args)
    return settings.as_micro() if micro else settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        results = Comparison(settings, os.environ).run()
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
