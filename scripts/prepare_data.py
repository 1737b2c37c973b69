"""Convert a jsonl file into a binidx (.bin/.idx) token file for window (pretraining-style) training.

    python -m scripts.prepare_data --input data.jsonl --output_prefix data/mydata

Each record becomes one document: {"text"} records as is; {"prompt", "response"} and {"messages"} records
rendered in the RWKV World chat format. The end-of-text token 0 is appended after every document (the RWKV
make_data convention), so documents are separated by 0 in the flat token stream.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.data.binidx import bin_path, idx_path, prefix_of
from src.data.prepare import jsonl_to_binidx
from src.errors import RWKVBoneError

DESCRIPTION = """\
Tokenize a jsonl file with the RWKV World tokenizer into OUTPUT_PREFIX.bin / OUTPUT_PREFIX.idx
(Megatron MMIDIDX, uint16, one document per record, token 0 appended after each document).

Records: {"text": ...}, {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]}.
Chat records are rendered as "User: ...\\n\\nAssistant: ...\\n\\n" text. A binidx file cannot store loss
masks, so training on it trains on every token; for SFT with loss only on the responses, train on the
jsonl file directly (data_type sft) instead of converting it.
The output is written to temporary names and renamed when complete (.bin first, then .idx).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="input .jsonl file")
    parser.add_argument(
        "--output_prefix", required=True, type=Path, help="output path without extension (writes .bin and .idx)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    prefix = prefix_of(args.output_prefix)
    if args.input.resolve() in (bin_path(prefix).resolve(), idx_path(prefix).resolve()):
        print(f"error: --input {args.input} is one of the output files {prefix}.bin / {prefix}.idx; choose another "
              f"--output_prefix", file=sys.stderr)
        return 1
    try:
        num_docs, num_tokens = jsonl_to_binidx(args.input, prefix, show_progress=not args.quiet)
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {prefix}.bin and {prefix}.idx: {num_docs} documents, {num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
