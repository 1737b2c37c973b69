"""jsonl/Parquet -> binidx conversion: each record becomes one document (src/data/jsonl.py: {"text"} as is,
prompt/response, messages, ShareGPT conversations and Alpaca records rendered in the RWKV World chat format),
tokenized with the World tokenizer and followed by the end-of-text token 0 (the RWKV make_data convention).

Chat text is tokenized in its prompt and response pieces, as the SFT reader does, so the role markers are found
again in the tokens: such a file trains unmasked windows with ``--data_type binidx`` and assistant-only
documents with ``--data_type sft`` (src/data/roles.py). Bad records stop the conversion with file:line (or
file row N) and the fix, or, with ``skip_bad_records``, are left out and counted by reason.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.data.binidx import BinIdxWriter
from src.data.jsonl import record_tokens
from src.data.roles import RoleMarkers
from src.data.sources import BadRecords, RecordError, count_records, iter_records
from src.data.tokenizer import WorldTokenizer
from src.errors import DataError


def count_lines(path: Path) -> int:
    """Number of lines of a file (or rows of a Parquet file), for the progress bar total; 0 if it does not exist."""
    return count_records(path)


@dataclass
class PrepareResult:
    """What ``records_to_binidx`` wrote: documents, tokens, and the skipped bad records by reason."""

    documents: int
    tokens: int
    skipped: dict[str, int] = field(default_factory=dict)
    summary: str = ""


def records_to_binidx(input_file: Path, output_prefix: Path, show_progress: bool = True,
                      role_markers: Sequence[str] | RoleMarkers | None = None,
                      skip_bad_records: bool = False) -> PrepareResult:
    """Write output_prefix.bin/.idx (uint16, atomically) from a jsonl or Parquet file."""
    from tqdm import tqdm

    tokenizer = WorldTokenizer()
    roles = RoleMarkers.parse(role_markers)
    bad = BadRecords(skip_bad_records)
    num_docs = 0
    num_tokens = 0
    with BinIdxWriter(output_prefix, dtype=np.uint16) as writer, tqdm(
        total=count_records(input_file), unit="record", desc="tokenizing", disable=not show_progress
    ) as progress:
        for where, record in iter_records(input_file, bad):
            try:
                tokens = record_tokens(record, where, tokenizer, roles)
            except RecordError as e:
                bad.add(e)
                continue
            writer.add_document(tokens)
            num_docs += 1
            num_tokens += len(tokens)
            progress.update(1)
        if num_docs == 0:
            if bad.skipped:
                raise DataError(f"no usable records, nothing written: {bad.summary(input_file)}")
            raise DataError(f"{input_file}: no records (the file is empty or blank); nothing written")
    return PrepareResult(num_docs, num_tokens, dict(bad.counts), bad.summary(input_file) if bad.skipped else "")


def jsonl_to_binidx(input_file: Path, output_prefix: Path, show_progress: bool = True) -> tuple[int, int]:
    """``records_to_binidx`` with the default role markers, stopping at the first bad record: (documents, tokens)."""
    result = records_to_binidx(input_file, output_prefix, show_progress)
    return result.documents, result.tokens
