"""Convert a jsonl file into a binidx (.bin/.idx) token file for window (pretraining-style) training.

Each record becomes one document: {"text"} records as is; {"prompt", "response"} and {"messages"} records
rendered in the RWKV World chat format. The end-of-text token 0 is appended after every document (the RWKV
make_data convention), so documents are separated by 0 in the flat token stream.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.data.binidx import BinIdxWriter, bin_path, idx_path, prefix_of  # noqa: E402
from src.data.jsonl import iter_jsonl, plain_text  # noqa: E402
from src.data.tokenizer import WorldTokenizer  # noqa: E402
from src.errors import DataError, RWKVBoneError  # noqa: E402

DESCRIPTION = """\
Tokenize a jsonl file with the RWKV World tokenizer into OUTPUT_PREFIX.bin / OUTPUT_PREFIX.idx
(Megatron MMIDIDX, uint16, one document per record, token 0 appended after each document).

Records: {"text": ...}, {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]}.
Chat records are rendered as "User: ...\\n\\nAssistant: ...\\n\\n" text. A binidx file cannot store loss
masks, so training on it trains on every token; for SFT with loss only on the responses, train on the
jsonl file directly (data_type sft) instead of converting it.
The output is written to temporary names and renamed when complete (.bin first, then .idx).
"""


def count_lines(path: Path) -> int:
    """Number of lines of a file (for the progress bar total); 0 if it does not exist."""
    if not path.is_file():
        return 0
    count = 0
    last = b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def convert(input_file: Path, output_prefix: Path, show_progress: bool = True) -> tuple[int, int]:
    """Write the binidx files; returns (documents, tokens)."""
    tokenizer = WorldTokenizer()
    num_docs = 0
    num_tokens = 0
    with BinIdxWriter(output_prefix, dtype=np.uint16) as writer, tqdm(
        total=count_lines(input_file), unit="line", desc="tokenizing", disable=not show_progress
    ) as progress:
        for line_no, record in iter_jsonl(input_file):
            where = f"{input_file}:{line_no}"
            text = plain_text(record, where)
            try:
                tokens = tokenizer.encode(text)
            except DataError as e:
                raise DataError(f"{where}: {e}") from e
            tokens.append(tokenizer.eos_id)
            writer.add_document(tokens)
            num_docs += 1
            num_tokens += len(tokens)
            progress.update(line_no - progress.n)
        if num_docs == 0:
            raise DataError(f"{input_file}: no records (the file is empty or blank); nothing written")
    return num_docs, num_tokens


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
        num_docs, num_tokens = convert(args.input, prefix, show_progress=not args.quiet)
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {prefix}.bin and {prefix}.idx: {num_docs} documents, {num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
