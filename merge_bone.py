"""Merge a Bone / LoRA / PiSSA adapter file into an RWKV6 x060 base checkpoint (or unmerge it).

    python merge_bone.py --base_model BASE.pth --bone ADAPTER.safetensors --output OUT.pth [--unmerge]

The output (.pth or .safetensors, by extension) is a standard x060 checkpoint without adapter keys, written
atomically while streaming tensor by tensor. Errors about the inputs print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from src.adapters.export import merge_checkpoint_file
from src.errors import RWKVBoneError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", required=True, help="base checkpoint (.pth or .safetensors)")
    parser.add_argument("--bone", required=True, help="adapter file written by the trainer (.safetensors)")
    parser.add_argument("--output", required=True, help="output checkpoint (.pth or .safetensors)")
    parser.add_argument("--unmerge", action="store_true",
                        help="recover the base from --base_model, a checkpoint this adapter was merged into")
    parser.add_argument("--state_only", action="store_true",
                        help="write only the trained initial state (blocks.N.att.time_state) of a state-tuned adapter")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = merge_checkpoint_file(args.base_model, args.bone, args.output, unmerge=args.unmerge,
                                        state_only=args.state_only)
    except RWKVBoneError as e:
        print(f"merge_bone.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cfg = summary.cfg
    kind = (f"b={cfg.b}, grouping={cfg.grouping}" if cfg.method.startswith("bone") else "initial state"
            if cfg.method == "state" else f"r={cfg.lora_r}, alpha={cfg.lora_alpha}")
    per_projection = Counter(".".join(name.split(".")[2:4]) if name.startswith("blocks.") else name
                             for name in summary.changed)
    action = "unmerged" if args.unmerge else "merged"
    print(f"{action} {cfg.method} ({kind}) into {len(summary.changed)} tensors of {args.base_model}: "
          + ", ".join(f"{k} x{n}" for k, n in per_projection.items()))
    print(f"wrote {summary.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
