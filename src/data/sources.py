"""Reading records (one JSON object each) from jsonl and Parquet files, and bad-record handling.

Files:
    .jsonl    one JSON object per line; blank lines are skipped; a UTF-8 BOM on the first line is accepted.
              A record is named ``path:LINE`` (lines count from 1, as editors show them).
    .parquet  one record per row (the form in which hub datasets are distributed); only the columns that hold
              record fields are read (``RECORD_COLUMNS``), and null cells count as absent keys (an Alpaca row with
              a null ``input`` is a row without input). A record is named ``path row N`` (rows count from 0, as
              pandas and ``datasets`` index them). A file is Parquet when its name ends in ``.parquet`` or its
              first bytes are the Parquet magic ``PAR1``; reading it needs ``pyarrow``.

Bad records: every problem with one record (invalid UTF-8 or JSON on its line, a field of the wrong type, no
assistant turn, ...) is a ``RecordError`` naming the record and the fix, with a short ``reason``. ``BadRecords``
decides what happens to it: by default the first one stops the run with its message (plus a hint about
``--skip_bad_records``); with ``skip=True`` the record is left out and counted by reason, and ``summary()``
says how many were skipped for which reason and where the first of each was. Problems with the file itself
(missing, not Parquet, no usable column) are plain ``DataError``s and always stop.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.errors import DataError

# Record fields a row may carry (the keys every record kind of src/data/jsonl.py reads).
RECORD_COLUMNS = ("text", "prompt", "response", "messages", "conversations", "instruction", "input", "output",
                  "system")
PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024
SKIP_HINT = "(or pass --skip_bad_records 1 to leave such records out; they are counted and reported)"


class RecordError(DataError):
    """One bad record; ``reason`` is the short category it is counted under when bad records are skipped."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BadRecords:
    """What to do with bad records of one file: raise the first (``skip=False``) or count them by reason."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}  # reason -> the message of its first record
        self.seen = 0  # records looked at, bad ones included

    def add(self, error: RecordError, count: int = 1) -> None:
        """Count ``error`` (skip mode; ``count`` records alike, ``error`` naming the first) or raise it with a
        hint about --skip_bad_records."""
        if not self.skip:
            raise DataError(f"{error} {SKIP_HINT}") from error
        self.counts[error.reason] = self.counts.get(error.reason, 0) + count
        self.first.setdefault(error.reason, str(error))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self, path: str | os.PathLike) -> str:
        """One line per reason, e.g. ``data.jsonl: skipped 3 of 120 records: 2 invalid JSON (first: ...)``."""
        if not self.counts:
            return f"{path}: no bad records"
        parts = [f"{n} {reason} (first: {self.first[reason]})" for reason, n in
                 sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))]
        return f"{path}: skipped {self.skipped} of {self.seen} records: " + "; ".join(parts)


def is_parquet(path: str | os.PathLike) -> bool:
    """True for a ``.parquet`` name or a file that starts with the Parquet magic bytes."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    except OSError:
        return False


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass an existing .jsonl or .parquet file")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    """(line number, object or the RecordError of that line) for each non-blank line."""
    _require_file(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, RecordError(
                    f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line; save the file as UTF-8",
                    "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                yield line_no, RecordError(
                    f"{path}:{line_no}: not valid JSON ({e}); each line must be one JSON object", "invalid JSON")
                continue
            if not isinstance(record, dict):
                yield line_no, RecordError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}; "
                    "each line must be one JSON object such as {\"text\": ...}", "not a JSON object")
                continue
            yield line_no, record


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a jsonl file; the first bad line raises."""
    for line_no, item in _jsonl_lines(Path(path)):
        if isinstance(item, RecordError):
            raise item
        yield line_no, item


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading Parquet files needs pyarrow: pip install pyarrow (listed in requirements.txt)") from e
    return pq


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index from 0, record) for each row; null cells are left out of the record."""
    _require_file(path)
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); pass a .parquet file or a .jsonl file") from e
    columns = [name for name in names if name in RECORD_COLUMNS]
    if not columns:
        raise DataError(
            f"{path}: Parquet columns {names} hold no record field; expected a 'text' column, 'prompt'+'response', "
            "'messages', 'conversations' (ShareGPT) or 'instruction'+'output' (Alpaca); rename the columns"
        )
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                yield row, {key: value for key, value in record.items() if value is not None}
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the rows after row {row} ({e}); the file is truncated or corrupt, "
                        "download or write it again") from e


def iter_records(path: str | os.PathLike, bad: BadRecords | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a .jsonl or .parquet file; ``where`` is ``path:LINE`` or ``path row N``.

    Lines that are not a JSON object go to ``bad`` (raising by default). ``bad.seen`` counts every record."""
    bad = bad if bad is not None else BadRecords()
    path = Path(path)
    if is_parquet(path):
        for row, record in _parquet_rows(path):
            bad.seen += 1
            yield f"{path} row {row}", record
        return
    for line_no, item in _jsonl_lines(path):
        bad.seen += 1
        if isinstance(item, RecordError):
            bad.add(item)
            continue
        yield f"{path}:{line_no}", item


def count_records(path: str | os.PathLike) -> int:
    """Rows of a Parquet file or lines of a jsonl file (a progress-bar total); 0 if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return 0
    if is_parquet(path):
        try:
            return int(_pyarrow_parquet().ParquetFile(path).metadata.num_rows)
        except Exception:  # only a progress total: reading the file reports the real error
            return 0
    count = 0
    last = b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
