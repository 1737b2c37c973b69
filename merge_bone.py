"""Merge a Bone / MiSS / LoRA / PiSSA adapter into an RWKV6 x060 base (or unmerge it, or only convert the base) and
write it for the engine you run it in.

    python merge_bone.py --base_model BASE [--bone ADAPTER] --output OUT [--format pth|safetensors|hf|gguf|ai00]
                         [--dtype fp32|fp16|bf16|q8_0] [--unmerge] [--state_only]

The format follows OUT's extension unless --format is given: .pth and .safetensors (the official checkpoint, for
the `rwkv` package, RWKV-LM, RWKV-Runner), .gguf (llama.cpp; default fp16, also fp32, bf16, q8_0), .st (Ai00 /
web-rwkv, fp16), anything else a Hugging Face folder (Rwkv6ForCausalLM). Without --bone the base is only
converted. Every output is written atomically while streaming tensor by tensor and holds only the model's
tensors. Errors about the inputs print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from src.errors import RWKVBoneError
from src.export.convert import export_model
from src.export.formats import DTYPES, FORMATS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", required=True, help="base checkpoint (.pth or .safetensors)")
    parser.add_argument("--bone", default=None,
                        help="adapter file written by the trainer (.safetensors); without it the base is converted")
    parser.add_argument("--output", required=True,
                        help="output: .pth, .safetensors, .gguf, .st (Ai00) or a folder (Hugging Face)")
    parser.add_argument("--format", default=None, choices=FORMATS, help="output format (default: from --output)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="tensor dtype (default: the base's for pth/safetensors/hf, fp16 for gguf and ai00; "
                             "q8_0 only for gguf)")
    parser.add_argument("--unmerge", action="store_true",
                        help="recover the base from --base_model, a checkpoint this adapter was merged into")
    parser.add_argument("--state_only", action="store_true",
                        help="write only the trained initial state (blocks.N.att.time_state) of a state-tuned adapter")
    parser.add_argument("--quant", default=None, choices=("int8", "nf4"),
                        help="merge onto the dequantised base the adapter was trained against (train.py --quant); "
                             "default: the original full-precision base")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = export_model(args.base_model, args.bone, args.output, fmt=args.format, dtype=args.dtype,
                               unmerge=args.unmerge, state_only=args.state_only, quant=args.quant)
    except RWKVBoneError as e:
        print(f"merge_bone.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cfg = summary.cfg
    if cfg is not None:
        kind = (f"b={cfg.b}, grouping={cfg.grouping}" if cfg.method.startswith("bone") else "initial state"
                if cfg.method == "state" else f"r={cfg.miss_r}" if cfg.method == "miss"
                else f"r={cfg.lora_r}, alpha={cfg.lora_alpha}")
        per_projection = Counter(".".join(name.split(".")[2:4]) if name.startswith("blocks.") else name
                                 for name in summary.changed)
        action = "unmerged" if args.unmerge else "merged"
        print(f"{action} {cfg.method} ({kind}) into {len(summary.changed)} tensors of {args.base_model}: "
              + ", ".join(f"{k} x{n}" for k, n in per_projection.items()))
    else:
        print(f"converted {args.base_model} (no adapter)")
    for note in summary.notes:
        print(f"note: {note}")
    print(f"wrote {summary.output} ({summary.format}, {summary.dtype or 'dtypes of the base'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
