"""binidx reader/writer against an independent struct/numpy writer, scripts.prepare_data round trip, bad files."""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.data.binidx import BinIdxDataset, BinIdxWriter
from src.data.tokenizer import WorldTokenizer
from src.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
NP_DTYPES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}


def write_reference(
    prefix: Path,
    docs: list[list[int]],
    code: int = 8,
    magic: bytes = b"MMIDIDX\x00\x00",
    version: int = 1,
    pointers: list[int] | None = None,
) -> None:
    """An independent MMIDIDX writer, straight from the format description."""
    np_dtype = np.dtype(NP_DTYPES.get(code, "<u2"))
    data = b"".join(np.asarray(d, dtype=np_dtype).tobytes() for d in docs)
    sizes = [len(d) for d in docs]
    if pointers is None:
        pointers, at = [], 0
        for size in sizes:
            pointers.append(at)
            at += size * np_dtype.itemsize
    doc_idx = list(range(len(docs) + 1))
    index = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    index += struct.pack("<Q", len(docs)) + struct.pack("<Q", len(doc_idx))
    index += struct.pack(f"<{len(sizes)}i", *sizes)
    index += struct.pack(f"<{len(pointers)}q", *pointers)
    index += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    Path(f"{prefix}.bin").write_bytes(data)
    Path(f"{prefix}.idx").write_bytes(index)


DOCS = [[5, 6, 7, 0], [9, 0], [1, 2, 3, 4, 65535, 0]]


def test_reads_reference_file(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    data = BinIdxDataset(tmp_path / "d")
    assert data.num_docs == len(data) == 3
    assert data.total_tokens == 12
    for i, doc in enumerate(DOCS):
        assert data.get(i).tolist() == doc
    assert data.get(2, offset=1, length=3).tolist() == [2, 3, 4]
    assert data.tokens(3, 4).tolist() == [0, 9, 0, 1]
    assert data.doc_of(5) == 1 and data.doc_of(6) == 2
    assert data.dtype == np.uint16


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5])
def test_reads_other_integer_dtypes(tmp_path: Path, code: int) -> None:
    docs = [[1, 2, 0], [100, 0]]
    write_reference(tmp_path / "d", docs, code=code)
    data = BinIdxDataset(tmp_path / "d.idx")
    assert [data.get(i).tolist() for i in range(2)] == docs


def test_writer_is_byte_identical_to_reference(tmp_path: Path) -> None:
    write_reference(tmp_path / "ref", DOCS)
    with BinIdxWriter(tmp_path / "ours") as writer:
        for doc in DOCS:
            writer.add_document(doc)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_writer_failure_leaves_no_files_and_keeps_old_ones(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    old_bin, old_idx = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with BinIdxWriter(tmp_path / "d") as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert (tmp_path / "d.bin").read_bytes() == old_bin and (tmp_path / "d.idx").read_bytes() == old_idx


def test_writer_rejects_tokens_outside_dtype(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="document 1"):
        with BinIdxWriter(tmp_path / "d") as writer:
            writer.add_document([1])
            writer.add_document([70000])
    assert list(tmp_path.iterdir()) == []


def test_pickle_reopens_memory_map(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    clone = pickle.loads(pickle.dumps(BinIdxDataset(tmp_path / "d")))
    assert clone.tokens(0, 12).tolist() == sum(DOCS, [])


def test_prepare_data_round_trip(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    texts = ["Hello world.", "你好，世界 🎉", "", "code:\n\tx = 1\n"]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(2, "")
    lines.append(json.dumps({"prompt": "Q?", "response": "A."}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.prepare_data", "--input", str(tmp_path / "in.jsonl"),
         "--output_prefix", str(tmp_path / "out" / "data")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin", "data.idx"]
    data = BinIdxDataset(tmp_path / "out" / "data")
    expected = texts + ["User: Q?\n\nAssistant: A.\n\n"]
    assert data.num_docs == len(expected)
    for i, text in enumerate(expected):
        doc = data.get(i).tolist()
        assert doc[-1] == 0
        assert doc[:-1] == tokenizer.encode(text)


def test_prepare_data_reports_bad_line(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.prepare_data", "--input", str(tmp_path / "in.jsonl"),
         "--output_prefix", str(tmp_path / "data"), "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "in.jsonl:2" in result.stderr and "'text'" in result.stderr
    assert list(tmp_path.glob("data*")) == [] and list(tmp_path.glob(".data*")) == []


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d\.idx: file not found"):
        BinIdxDataset(tmp_path / "d")
    write_reference(tmp_path / "d", DOCS)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(DataError, match=r"d\.bin: file not found"):
        BinIdxDataset(tmp_path / "d")


def test_bad_magic(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS, magic=b"NOTMMIDX\x00")
    with pytest.raises(DataError, match="bad magic .* at byte 0"):
        BinIdxDataset(tmp_path / "d")


def test_bad_version(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS, version=2)
    with pytest.raises(DataError, match="version 2"):
        BinIdxDataset(tmp_path / "d")


@pytest.mark.parametrize("code,match", [(9, "unknown dtype code 9"), (0, "unknown dtype code 0"), (6, "float")])
def test_bad_dtype_code(tmp_path: Path, code: int, match: str) -> None:
    write_reference(tmp_path / "d", DOCS, code=code)
    with pytest.raises(DataError, match=match):
        BinIdxDataset(tmp_path / "d")


def test_truncated_bin(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    with open(tmp_path / "d.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match=r"d\.bin: file is 20 bytes .* describes 24 bytes .* truncated"):
        BinIdxDataset(tmp_path / "d")


def test_bin_longer_than_index(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    with open(tmp_path / "d.bin", "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match="longer than its index"):
        BinIdxDataset(tmp_path / "d")


def test_truncated_idx(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(raw[:-8])
    with pytest.raises(DataError, match="idx is truncated"):
        BinIdxDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(raw[:20])
    with pytest.raises(DataError, match="shorter than the 34-byte"):
        BinIdxDataset(tmp_path / "d")


def test_pointer_out_of_range(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS, pointers=[0, 8, 4000])
    with pytest.raises(DataError, match="pointer of document 2 is 4000, expected 12"):
        BinIdxDataset(tmp_path / "d")


def test_token_id_outside_vocab(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", [[1, 2, 0], [3, 70000, 0]], code=4)
    with pytest.raises(DataError, match=r"token id 70000 at token position 4 \(document 1, offset 1\)"):
        BinIdxDataset(tmp_path / "d")
    assert BinIdxDataset(tmp_path / "d", vocab_size=70001).get(1).tolist() == [3, 70000, 0]


def test_negative_token_id(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", [[1, -5, 0]], code=3)
    with pytest.raises(DataError, match="token id -5 at token position 1"):
        BinIdxDataset(tmp_path / "d")


def test_smaller_vocab_checks_uint16(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", DOCS)
    with pytest.raises(DataError, match="token id 65535 at token position 10 .*document 2, offset 4"):
        BinIdxDataset(tmp_path / "d", vocab_size=65530)


def test_empty_dataset(tmp_path: Path) -> None:
    write_reference(tmp_path / "d", [])
    with pytest.raises(DataError, match="no documents"):
        BinIdxDataset(tmp_path / "d")
    write_reference(tmp_path / "e", [[], []])
    with pytest.raises(DataError, match="all empty"):
        BinIdxDataset(tmp_path / "e")


def _valid_files() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        write_reference(Path(folder) / "d", DOCS)
        return (Path(folder) / "d.idx").read_bytes(), (Path(folder) / "d.bin").read_bytes()


VALID_IDX, VALID_BIN = _valid_files()


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[bytes, bytes]:
    idx, data = bytearray(VALID_IDX), bytearray(VALID_BIN)
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from(["idx", "bin"]))
        buf = idx if target == "idx" else data
        action = draw(st.sampled_from(["flip", "truncate", "append"]))
        if action == "flip" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif action == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        else:
            buf.extend(draw(st.binary(max_size=16)))
    return bytes(idx), bytes(data)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(corrupted(), st.tuples(st.binary(max_size=120), st.binary(max_size=40))))
def test_fuzz_reader_loads_or_raises_data_error(files: tuple[bytes, bytes]) -> None:
    idx, data = files
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "d"
        Path(f"{prefix}.idx").write_bytes(idx)
        Path(f"{prefix}.bin").write_bytes(data)
        try:
            dataset = BinIdxDataset(prefix)
        except DataError:
            return
        tokens = np.concatenate([dataset.get(i) for i in range(dataset.num_docs)])
        assert len(tokens) == dataset.total_tokens > 0
        assert tokens.min() >= 0 and tokens.max() < 65536
        assert dataset.tokens(0, dataset.total_tokens).tolist() == tokens.tolist()
