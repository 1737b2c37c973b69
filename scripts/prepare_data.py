"""Convert a jsonl or Parquet file into a binidx (.bin/.idx) token file.

    python -m scripts.prepare_data --input data.jsonl --output_prefix data/mydata
    python -m scripts.prepare_data --input train-00000-of-00001.parquet --output_prefix data/mydata --skip_bad_records

Each record becomes one document (src/data/jsonl.py lists the record kinds); the end-of-text token 0 is appended
after every document (the RWKV make_data convention), so documents are separated by 0 in the flat token stream.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.data.binidx import bin_path, idx_path, prefix_of
from src.data.prepare import records_to_binidx
from src.data.roles import DEFAULT_ROLE_MARKERS
from src.errors import RWKVBoneError

DESCRIPTION = """\
Tokenize a jsonl or Parquet file with the RWKV World tokenizer into OUTPUT_PREFIX.bin / OUTPUT_PREFIX.idx
(Megatron MMIDIDX, uint16, one document per record, token 0 appended after each document).

Records (jsonl lines or Parquet rows): {"text": ...}; {"prompt": ..., "response": ...};
{"messages": [{"role", "content"}, ...]}; ShareGPT {"conversations": [{"from", "value"}, ...]};
Alpaca {"instruction", "input", "output"}. Chat records are rendered as "User: ...\\n\\nAssistant: ...\\n\\n"
text (Alpaca as "Instruction: ...\\n\\nInput: ...\\n\\nResponse: ...\\n\\n"). A binidx file holds no loss masks:
--data_type binidx trains every token, --data_type sft finds the role markers (User:/Assistant:/...) in the
tokens again and trains only the assistant turns. Chat text is tokenized in its prompt and response pieces,
as the SFT reader does, so that both give the same tokens and masks.
The output is written to temporary names and renamed when complete (.idx first, then .bin).
"""


def _switch(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="input .jsonl or .parquet file")
    parser.add_argument(
        "--output_prefix", required=True, type=Path, help="output path without extension (writes .bin and .idx)"
    )
    parser.add_argument("--role_markers", nargs="*", default=list(DEFAULT_ROLE_MARKERS),
                        help="role names of 'text' records: user=Name,... assistant=Name,... "
                             f"(default: {' '.join(DEFAULT_ROLE_MARKERS)})")
    parser.add_argument("--skip_bad_records", type=_switch, nargs="?", const=True, default=False,
                        help="leave bad records out (counted and reported by reason) instead of stopping; "
                             "takes an optional 1/0")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    prefix = prefix_of(args.output_prefix)
    if args.input.resolve() in (bin_path(prefix).resolve(), idx_path(prefix).resolve()):
        print(f"error: --input {args.input} is one of the output files {prefix}.bin / {prefix}.idx; choose another "
              f"--output_prefix", file=sys.stderr)
        return 1
    try:
        result = records_to_binidx(args.input, prefix, show_progress=not args.quiet, role_markers=args.role_markers,
                                   skip_bad_records=args.skip_bad_records)
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.summary:
        print(result.summary, file=sys.stderr)
    print(f"wrote {prefix}.bin and {prefix}.idx: {result.documents} documents, {result.tokens} tokens"
          + (f" ({sum(result.skipped.values())} bad records skipped)" if result.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
