"""Megatron MMIDIDX ``.bin``/``.idx`` token files (the format RWKV-LM's ``make_data.py`` writes): reader and writer.

``.idx`` layout, all little-endian:
    magic  b"MMIDIDX\\x00\\x00" (9 bytes)
    version <Q (= 1)
    dtype code <B (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6/7 float64, 8 uint16)
    len <Q: number of sequences (one per document in RWKV files)
    doc_count <Q: length of doc_idx
    sizes int32[len] (tokens per sequence), pointers int64[len] (byte offset in .bin), doc_idx int64[doc_count]
``.bin`` is the sequences' tokens back to back. This module treats each sequence as a document and requires the
sequences to be contiguous (pointer i = bytes of sequences 0..i-1, .bin size = all of them), which every
Megatron/RWKV writer produces; so the .bin is also one flat token stream.
"""
from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from src.atomic import atomic_path
from src.errors import ConfigError, DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, len, doc_count
INT_DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
FLOAT_DTYPE_CODES = (6, 7)
SCAN_CHUNK_TOKENS = 1 << 24


def prefix_of(path: str | os.PathLike) -> Path:
    """The binidx prefix of ``path``: ``data/x``, ``data/x.bin`` and ``data/x.idx`` all give ``data/x``."""
    p = Path(path)
    if p.suffix in (".bin", ".idx"):
        return p.with_suffix("")
    return p


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def dtype_code(dtype: np.dtype | type) -> int:
    """The MMIDIDX code of an integer token dtype."""
    wanted = np.dtype(dtype)
    for code, candidate in INT_DTYPE_CODES.items():
        if candidate == wanted:
            return code
    known = sorted(str(d) for d in INT_DTYPE_CODES.values())
    raise ConfigError(f"token dtype {wanted} has no MMIDIDX code; use one of {known}")


class BinIdxDataset:
    """Memory-mapped, validated reader of one ``prefix.bin``/``prefix.idx`` pair.

    Opening checks the header, sizes, pointers and file sizes; with ``check_tokens`` it also scans every token
    for ids outside ``[0, vocab_size)`` (skipped when the dtype cannot hold such ids, e.g. uint16 with 65536).
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int = 65536, check_tokens: bool = True) -> None:
        self.prefix = prefix_of(prefix)
        self.vocab_size = vocab_size
        self._open(check_tokens)

    def _open(self, check_tokens: bool) -> None:
        idx_file, data_file = idx_path(self.prefix), bin_path(self.prefix)
        for f in (idx_file, data_file):
            if not f.is_file():
                raise DataError(
                    f"{f}: file not found; a binidx dataset needs both {data_file.name} and {idx_file.name} "
                    "(create them with python -m scripts.prepare_data)"
                )
        dtype, num_seqs, doc_count = self._read_header(idx_file)
        idx_size = idx_file.stat().st_size
        expected_idx = HEADER_SIZE + num_seqs * (4 + 8) + doc_count * 8
        if idx_size != expected_idx:
            raise DataError(
                f"{idx_file}: file is {idx_size} bytes but its header ({num_seqs} sequences, {doc_count} doc_idx "
                f"entries) needs {expected_idx}; the .idx is truncated or corrupt, re-create it"
            )
        if num_seqs == 0:
            raise DataError(f"{idx_file}: the dataset has no documents; write some data into it")
        index = np.memmap(idx_file, mode="r", dtype=np.uint8)
        sizes = index[HEADER_SIZE : HEADER_SIZE + 4 * num_seqs].view("<i4")
        pointers_start = HEADER_SIZE + 4 * num_seqs
        pointers = index[pointers_start : pointers_start + 8 * num_seqs].view("<i8")
        doc_idx = index[pointers_start + 8 * num_seqs :].view("<i8")
        self._check_sizes_and_pointers(idx_file, data_file, dtype, sizes, pointers)
        self._check_doc_idx(idx_file, doc_idx, num_seqs)

        self.dtype = dtype
        self.sizes = sizes  # (num_docs,) int32
        self.doc_offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))  # (num_docs + 1,) token offsets
        self.total_tokens = int(self.doc_offsets[-1])
        if self.total_tokens == 0:
            raise DataError(f"{data_file}: the dataset's {num_seqs} documents are all empty; write some tokens")
        self._flat = np.memmap(data_file, mode="r", dtype=dtype.newbyteorder("<"))  # (total_tokens,)
        if check_tokens:
            self._check_token_range(data_file)

    def _read_header(self, idx_file: Path) -> tuple[np.dtype, int, int]:
        with open(idx_file, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise DataError(
                f"{idx_file}: only {len(header)} bytes, shorter than the {HEADER_SIZE}-byte MMIDIDX header; "
                "the .idx is truncated, re-create it"
            )
        if header[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{idx_file}: bad magic {header[:len(MAGIC)]!r} at byte 0 (expected {MAGIC!r}); "
                "this is not a Megatron MMIDIDX index, re-create it with python -m scripts.prepare_data"
            )
        (version,) = struct.unpack_from("<Q", header, len(MAGIC))
        if version != VERSION:
            raise DataError(f"{idx_file}: MMIDIDX version {version} at byte 9, only version {VERSION} is supported")
        (code,) = struct.unpack_from("<B", header, len(MAGIC) + 8)
        if code in FLOAT_DTYPE_CODES:
            raise DataError(f"{idx_file}: dtype code {code} (float) at byte 17; token files need an integer dtype")
        if code not in INT_DTYPE_CODES:
            raise DataError(
                f"{idx_file}: unknown dtype code {code} at byte 17 (known integer codes: {sorted(INT_DTYPE_CODES)})"
            )
        num_seqs, doc_count = struct.unpack_from("<QQ", header, len(MAGIC) + 9)
        return INT_DTYPE_CODES[code], num_seqs, doc_count

    @staticmethod
    def _check_sizes_and_pointers(
        idx_file: Path, data_file: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray
    ) -> None:
        negative = np.flatnonzero(sizes < 0)
        if negative.size:
            i = int(negative[0])
            raise DataError(f"{idx_file}: document {i} has negative size {int(sizes[i])}; the .idx is corrupt")
        nbytes = sizes.astype(np.int64) * dtype.itemsize  # (num_docs,)
        expected = np.concatenate(([0], np.cumsum(nbytes[:-1])))  # (num_docs,) contiguous byte offsets
        wrong = np.flatnonzero(pointers != expected)
        if wrong.size:
            i = int(wrong[0])
            raise DataError(
                f"{idx_file}: pointer of document {i} is {int(pointers[i])}, expected {int(expected[i])} "
                "(documents must be stored back to back in the .bin); the .idx is corrupt, re-create it"
            )
        bin_size = data_file.stat().st_size
        needed = int(nbytes.sum())
        if bin_size != needed:
            state = "truncated" if bin_size < needed else "longer than its index"
            raise DataError(
                f"{data_file}: file is {bin_size} bytes but {idx_file.name} describes {needed} bytes "
                f"({len(sizes)} documents of {dtype}); the .bin is {state}: re-create both files together"
            )

    @staticmethod
    def _check_doc_idx(idx_file: Path, doc_idx: np.ndarray, num_seqs: int) -> None:
        if doc_idx.size == 0:
            return
        if int(doc_idx[0]) != 0:
            raise DataError(f"{idx_file}: doc_idx[0] is {int(doc_idx[0])}, expected 0; the .idx is corrupt")
        bad = np.flatnonzero((doc_idx < 0) | (doc_idx > num_seqs))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{idx_file}: doc_idx[{i}] = {int(doc_idx[i])} is outside [0, {num_seqs}]; the .idx is corrupt"
            )
        decreasing = np.flatnonzero(np.diff(doc_idx) < 0)
        if decreasing.size:
            i = int(decreasing[0]) + 1
            raise DataError(f"{idx_file}: doc_idx decreases at entry {i}; the .idx is corrupt")

    def _check_token_range(self, data_file: Path) -> None:
        info = np.iinfo(self.dtype)
        if info.min >= 0 and info.max < self.vocab_size:
            return
        for start in range(0, self.total_tokens, SCAN_CHUNK_TOKENS):
            chunk = self._flat[start : start + SCAN_CHUNK_TOKENS]
            bad = np.flatnonzero((chunk < 0) | (chunk >= self.vocab_size))
            if bad.size:
                position = start + int(bad[0])
                doc = self.doc_of(position)
                raise DataError(
                    f"{data_file}: token id {int(self._flat[position])} at token position {position} "
                    f"(document {doc}, offset {position - int(self.doc_offsets[doc])}) is outside the model's "
                    f"vocabulary [0, {self.vocab_size}); the data was made with another tokenizer or is corrupt"
                )

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "vocab_size": self.vocab_size}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self.vocab_size = state["vocab_size"]
        self._open(check_tokens=False)

    @property
    def num_docs(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return self.num_docs

    def doc_of(self, position: int) -> int:
        """The document holding flat token ``position``."""
        return int(np.searchsorted(self.doc_offsets, position, side="right")) - 1

    def get(self, doc_i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc_i`` (a read-only view; to the end if no length)."""
        if not 0 <= doc_i < self.num_docs:
            raise IndexError(f"document {doc_i} out of range [0, {self.num_docs})")
        size = int(self.sizes[doc_i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"range [{offset}, {offset + length}) outside document {doc_i} of {size} tokens")
        start = int(self.doc_offsets[doc_i]) + offset
        return self._flat[start : start + length]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Flat tokens ``[start, start + length)`` of all documents back to back (a read-only view)."""
        if start < 0 or length < 0 or start + length > self.total_tokens:
            raise IndexError(f"token range [{start}, {start + length}) outside [0, {self.total_tokens})")
        return self._flat[start : start + length]


class BinIdxWriter:
    """Writes ``prefix.bin``/``prefix.idx`` atomically, one document per sequence (RWKV make_data layout).

    Use as a context manager; on a clean exit both files are written and fsynced completely, then the ``.idx``
    is renamed into place, then the ``.bin``. On an exception (a full disk included) both temporary files are
    removed and existing files are left as they were.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = prefix_of(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._sizes: list[int] = []
        self._stack: contextlib.ExitStack | None = None
        self._file = None

    def __enter__(self) -> BinIdxWriter:
        stack = contextlib.ExitStack()
        tmp_bin = stack.enter_context(atomic_path(bin_path(self.prefix)))
        self._file = stack.enter_context(open(tmp_bin, "wb"))
        self._stack = stack
        return self

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document's tokens (the caller appends the end-of-document token 0 if wanted)."""
        if self._file is None:
            raise RuntimeError("BinIdxWriter.add_document called outside its `with` block")
        doc = len(self._sizes)
        array = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens))
        if array.ndim != 1:
            raise DataError(f"document {doc}: tokens must be a flat sequence, got shape {array.shape}")
        if array.size:
            if array.dtype.kind not in "iu":
                raise DataError(f"document {doc}: tokens must be integers, got {array.dtype}")
            info = np.iinfo(self.dtype)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise DataError(
                    f"document {doc}: token ids span [{low}, {high}], outside {self.dtype} range "
                    f"[{info.min}, {info.max}]; choose a wider dtype"
                )
        if array.size > np.iinfo(np.int32).max:
            raise DataError(f"document {doc}: {array.size} tokens exceed the format's int32 size; split it")
        self._file.write(array.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._sizes.append(int(array.size))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, file, self._stack, self._file = self._stack, self._file, None, None
        if exc_type is not None:
            stack.__exit__(exc_type, exc, tb)
            return
        sizes = np.asarray(self._sizes, dtype="<i4")  # (num_docs,)
        pointers = np.zeros(len(sizes), dtype="<i8")  # (num_docs,) byte offset of each document
        pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype="<i8")  # (num_docs + 1,) one sequence per document
        with stack:  # leaving it closes and renames the .bin, after the .idx: no failed write touches the old pair
            file.flush()
            os.fsync(file.fileno())
            with atomic_path(idx_path(self.prefix)) as tmp_idx, open(tmp_idx, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, self._code, len(sizes), len(doc_idx)))
                f.write(sizes.tobytes())
                f.write(pointers.tobytes())
                f.write(doc_idx.tobytes())
