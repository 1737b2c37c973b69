"""jsonl -> binidx conversion for window (pretraining-style) training: each record becomes one document
({"text"} as is; {"prompt", "response"} and {"messages"} rendered in the RWKV World chat format), tokenized with
the World tokenizer and followed by the end-of-text token 0 (the RWKV make_data convention)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.data.binidx import BinIdxWriter
from src.data.jsonl import document_tokens, iter_jsonl, plain_text
from src.data.tokenizer import WorldTokenizer
from src.errors import DataError


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


def jsonl_to_binidx(input_file: Path, output_prefix: Path, show_progress: bool = True) -> tuple[int, int]:
    """Write output_prefix.bin/.idx (uint16, atomically) from a jsonl file; returns (documents, tokens)."""
    from tqdm import tqdm

    tokenizer = WorldTokenizer()
    num_docs = 0
    num_tokens = 0
    with BinIdxWriter(output_prefix, dtype=np.uint16) as writer, tqdm(
        total=count_lines(input_file), unit="line", desc="tokenizing", disable=not show_progress
    ) as progress:
        for line_no, record in iter_jsonl(input_file):
            where = f"{input_file}:{line_no}"
            tokens = document_tokens(plain_text(record, where), tokenizer, where)
            writer.add_document(tokens)
            num_docs += 1
            num_tokens += len(tokens)
            progress.update(line_no - progress.n)
        if num_docs == 0:
            raise DataError(f"{input_file}: no records (the file is empty or blank); nothing written")
    return num_docs, num_tokens
