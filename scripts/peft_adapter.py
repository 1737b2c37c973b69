"""Adapters in peft's on-disk format (adapter_config.json + adapter_model.safetensors), to and from this trainer's
adapter files, for MiSS, Bone (col grouping = peft's MiSS "bat") and LoRA/PiSSA (see src/export/peft.py for the
orientation of each):

    python -m scripts.peft_adapter --to_peft runs/miss/adapter-final.safetensors peft_adapter/
    python -m scripts.peft_adapter --from_peft peft_adapter/ adapter.safetensors --base_model BASE.pth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.adapters.export import open_checkpoint_lazily
from src.errors import RWKVBoneError
from src.export.peft import from_peft, to_peft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--to_peft", nargs=2, metavar=("ADAPTER", "OUT_DIR"), help="our adapter file -> peft folder")
    group.add_argument("--from_peft", nargs=2, metavar=("DIR", "OUT"), help="peft folder -> our .safetensors")
    parser.add_argument("--base_model", help="the base the adapter belongs to (needed with --from_peft)")
    args = parser.parse_args(argv)
    try:
        if args.to_peft:
            config = to_peft(*args.to_peft)
            print(f"wrote {args.to_peft[1]} (peft {config['peft_type']}, r={config['r']}, "
                  f"init_weights={config.get('init_weights', config.get('init_lora_weights'))})")
        else:
            if not args.base_model:
                parser.error("--from_peft needs --base_model (the adapter file records which base it fits)")
            shapes = open_checkpoint_lazily(Path(args.base_model)).shapes
            cfg = from_peft(args.from_peft[0], args.from_peft[1], shapes)
            print(f"wrote {args.from_peft[1]} ({cfg.method}, targets {', '.join(cfg.targets)})")
    except RWKVBoneError as e:
        print(f"peft_adapter: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
