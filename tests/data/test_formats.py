"""Record formats users have: Alpaca, ShareGPT, community chat text, Parquet files; bad records with file:line
(or file row N) and the fix; --skip_bad_records counting by reason; prepare_data on all of them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from src.data.binidx import BinIdxDataset
from src.data.dataset import build_datasets, build_eval_dataset, detect_data_type
from src.data.jsonl import chat_segments, read_sft_docs, read_text_docs, record_kind
from src.data.sources import BadRecords, iter_records
from src.data.tokenizer import WorldTokenizer
from src.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]

ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
ALPACA_NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "hi"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"}]}
CHAT_TEXT = {"text": "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: 4\n\n"}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                    encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows as a Parquet file; columns are the union of the rows' keys (a row without one holds null there)."""
    schema = pa.unify_schemas([pa.Table.from_pylist([row]).schema for row in rows])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def masked(tokens: np.ndarray, mask: np.ndarray, tokenizer: WorldTokenizer) -> tuple[str, str]:
    return tokenizer.decode(tokens[mask == 1].tolist()), tokenizer.decode(tokens.tolist())


def prepare(src: Path, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--input", str(src), "--output_prefix",
                           str(prefix), "--quiet", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- record kinds
def test_alpaca_renders_instruction_input_response(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, ALPACA_NO_INPUT, {**ALPACA_NO_INPUT, "system": "Be kind."}])
    docs = read_sft_docs(path, tokenizer)
    prompt = "Instruction: Translate to French.\n\nInput: cat\n\nResponse:"
    assert docs[0][0].tolist() == tokenizer.encode(prompt) + tokenizer.encode(" chat\n\n") + [0]
    assert docs[0][1].tolist() == [0] * len(tokenizer.encode(prompt)) + [1] * len(tokenizer.encode(" chat\n\n")) + [1]
    assert masked(*docs[1], tokenizer) == (" hi\n\n", "Instruction: Say hi.\n\nResponse: hi\n\n")
    assert masked(*docs[2], tokenizer)[1] == "System: Be kind.\n\nInstruction: Say hi.\n\nResponse: hi\n\n"


def test_sharegpt_and_chat_text_give_the_messages_tokens_and_masks(tmp_path: Path,
                                                                   tokenizer: WorldTokenizer) -> None:
    messages = {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                              "content": t["value"]} for t in SHAREGPT["conversations"]]}
    user_assistant = {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [SHAREGPT, messages, CHAT_TEXT, user_assistant])
    [share, msg, text, ua] = read_sft_docs(path, tokenizer)
    for doc in (msg, text):
        assert doc[0].tolist() == share[0].tolist() and doc[1].tolist() == share[1].tolist()
    assert masked(*share, tokenizer) == (" Hello!\n\n 4\n\n", CHAT_TEXT["text"])
    assert masked(*ua, tokenizer) == (" Yo\n\n", "User: Hi\n\nAssistant: Yo\n\n")


def test_record_kind_precedence() -> None:
    assert record_kind({**ALPACA, "text": "pre-rendered"}, "x") == "alpaca"
    assert record_kind({"conversations": [], "text": "t"}, "x") == "conversations"
    assert record_kind({"prompt": "p", "response": "r", "text": "t"}, "x") == "prompt"
    assert record_kind({"text": "t", "id": 7}, "x") == "text"
    segments = chat_segments({"conversations": [{"role": "USER", "content": "a"}, {"from": "GPT", "value": "b"}]}, "x")
    assert segments == [("User: a\n\nAssistant:", False), (" b\n\n", True)]


def test_jsonl_mode_trains_every_token_of_every_kind(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "plain"}, CHAT_TEXT, ALPACA])
    docs = read_text_docs(path, tokenizer)
    assert tokenizer.decode(docs[1].tolist()) == CHAT_TEXT["text"]
    built = build_datasets(path, "jsonl", 8, tokenizer, seed=0, num_samples=3)
    assert built.data_type == "jsonl" and all(built.train[i]["mask"].sum() > 0 for i in range(3))


def test_detect_data_type_by_first_record(tmp_path: Path) -> None:
    cases = {"plain": {"text": "Once upon a time.\n\nAssistant: not at the start"}, "chat": CHAT_TEXT,
             "alpaca": ALPACA, "share": SHAREGPT, "user_only": {"text": "User: no answer"}}
    expected = {"plain": "jsonl", "chat": "sft", "alpaca": "sft", "share": "sft", "user_only": "jsonl"}
    for name, record in cases.items():
        assert detect_data_type(write_jsonl(tmp_path / f"{name}.jsonl", [record])) == expected[name], name
        assert detect_data_type(write_parquet(tmp_path / f"{name}.parquet", [record])) == expected[name], name
    bad_first = write_jsonl(tmp_path / "bad_first.jsonl", ["{oops", CHAT_TEXT])
    with pytest.raises(DataError, match=r"bad_first\.jsonl:1: not valid JSON"):
        detect_data_type(bad_first)
    assert detect_data_type(bad_first, skip_bad_records=True) == "sft"


# ---------------------------------------------------------------------------------------------- Parquet
def test_parquet_records_equal_jsonl_records(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    for name, rows in {"alpaca": [ALPACA, {**ALPACA_NO_INPUT, "input": None}], "share": [SHAREGPT, SHAREGPT],
                       "text": [CHAT_TEXT, CHAT_TEXT]}.items():
        from_parquet = read_sft_docs(write_parquet(tmp_path / f"{name}.parquet", rows), tokenizer)
        from_jsonl = read_sft_docs(write_jsonl(tmp_path / f"{name}.jsonl", [
            {k: v for k, v in r.items() if v is not None} for r in rows]), tokenizer)
        assert [(t.tolist(), m.tolist()) for t, m in from_parquet] == [(t.tolist(), m.tolist()) for t, m in from_jsonl]
    path = write_parquet(tmp_path / "extra.parquet", [{"text": "a", "image": b"\x00" * 10, "score": 1.5}])
    assert [record for _, record in iter_records(path)] == [{"text": "a"}]  # only record columns are read


def test_parquet_training_and_eval(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    rows = [{"instruction": f"Add {i} and 1.", "input": None, "output": str(i + 1)} for i in range(10)]
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", rows)
    built = build_datasets(path, "auto", 32, tokenizer, seed=0, val_fraction=0.2)
    assert built.data_type == "sft" and len(built.train) == 8 and len(built.val) == 2
    assert len(build_eval_dataset(path, 32, tokenizer)) == 10
    text = write_parquet(tmp_path / "text.parquet", [{"text": f"story {i}"} for i in range(5)])
    assert build_datasets(text, "auto", 8, tokenizer, seed=0, num_samples=2).data_type == "jsonl"


def test_parquet_errors_name_the_row(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    rows = [ALPACA, ALPACA, {"instruction": "x", "input": "", "output": None}]
    with pytest.raises(DataError, match=r"a\.parquet row 2: missing key 'output'; expected 'instruction'"):
        read_sft_docs(write_parquet(tmp_path / "a.parquet", rows), tokenizer)
    with pytest.raises(DataError, match=r"cols\.parquet: Parquet columns \['question', 'answer'\] hold no record"):
        read_sft_docs(write_parquet(tmp_path / "cols.parquet", [{"question": "q", "answer": "a"}]), tokenizer)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        read_sft_docs(tmp_path / "broken.parquet", tokenizer)
    (tmp_path / "magic.data").write_bytes((tmp_path / "a.parquet").read_bytes())  # Parquet under another name
    with pytest.raises(DataError, match=r"magic\.data row 2"):
        read_sft_docs(tmp_path / "magic.data", tokenizer)


# ---------------------------------------------------------------------------------------------- bad records
BAD_LINES = [
    (json.dumps(ALPACA), None),
    ("{not json", r"bad\.jsonl:2: not valid JSON .*; each line must be one JSON object"),
    ('["a"]', r"bad\.jsonl:3: expected a JSON object, got list"),
    ('{"question": "q"}', r"bad\.jsonl:4: record has keys \['question'\]; expected 'text'.*rename the fields"),
    ('{"instruction": "i"}', r"bad\.jsonl:5: missing key 'output'; expected 'instruction', optional 'input'"),
    ('{"instruction": "i", "input": 3, "output": "o"}', r"bad\.jsonl:6: 'input' must be a string, got int"),
    ('{"conversations": [{"from": "tool", "value": "x"}]}',
     r"bad\.jsonl:7: conversations\[0\] has from 'tool'; expected one of .*; rename the speaker"),
    ('{"conversations": [{"from": "human", "value": "only"}]}',
     r"bad\.jsonl:8: 'conversations' has no assistant turn, so there is nothing to train on"),
    ('{"conversations": []}', r"bad\.jsonl:9: 'conversations' must be a non-empty list of \{'from', 'value'\}"),
    ('{"text": "User: no reply"}', r"bad\.jsonl:10: a plain 'text' record cannot be used for SFT: it has no "
                                   r"assistant turn \('Assistant:' or 'Response:' at the start"),
    ('{"text": "User: a\\n\\nAssistant: \\ud800"}', r"bad\.jsonl:11: text is not valid Unicode"),
    ('{"system": 5, "prompt": "p", "response": "r"}', r"bad\.jsonl:12: 'system' must be a string, got int"),
    (json.dumps(CHAT_TEXT), None),
]


@pytest.mark.parametrize("index", [i for i, (_, match) in enumerate(BAD_LINES) if match])
def test_each_bad_record_stops_with_file_line_and_fix(tmp_path: Path, tokenizer: WorldTokenizer, index: int) -> None:
    lines = [line if i == index or match is None else json.dumps(ALPACA) for i, (line, match) in enumerate(BAD_LINES)]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=BAD_LINES[index][1] + r".*--skip_bad_records 1"):
        read_sft_docs(path, tokenizer)


def test_skip_bad_records_counts_by_reason(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES] + [b"\xff".decode("latin-1")])
    path.write_bytes(path.read_bytes().replace("ÿ".encode(), b"\xff"))  # line 14: invalid UTF-8
    bad = BadRecords(skip=True)
    docs = read_sft_docs(path, tokenizer, bad=bad)
    assert len(docs) == 2 and bad.seen == 14 and bad.skipped == 12
    assert bad.counts == {"invalid JSON": 1, "not a JSON object": 1, "unknown record keys": 1, "missing field": 1,
                          "wrong field type": 2, "unknown role": 1, "no assistant turn": 2, "empty conversation": 1,
                          "invalid Unicode": 1, "invalid UTF-8": 1}
    summary = bad.summary(path)
    assert summary.startswith(f"{path}: skipped 12 of 14 records: 2 no assistant turn (first: {path}:8: ")
    assert f"1 invalid UTF-8 (first: {path}:14: invalid UTF-8" in summary

    logged: list[str] = []
    built = build_datasets(path, "sft", 64, tokenizer, seed=0, skip_bad_records=True, log=logged.append)
    assert len(built.train) == 2 and logged == built.report == [summary]
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        build_datasets(path, "sft", 64, tokenizer, seed=0)
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", ["{x", '{"text": "no turns"}'])
    with pytest.raises(DataError, match=r"no usable records: .*all_bad\.jsonl: skipped 2 of 2 records"):
        build_datasets(all_bad, "sft", 64, tokenizer, seed=0, skip_bad_records=True, log=None)


def test_skip_bad_records_in_window_mode(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "good one"}, "{broken", {"text": 3}, {"text": "two"}])
    logged: list[str] = []
    built = build_datasets(path, "jsonl", 4, tokenizer, seed=0, num_samples=2, skip_bad_records=True,
                           log=logged.append)
    assert built.train.stop == len(tokenizer.encode("good one")) + len(tokenizer.encode("two")) + 2
    assert logged == [f"{path}: skipped 2 of 4 records: 1 invalid JSON (first: {path}:2: not valid JSON "
                      + logged[0].split(f"{path}:2: not valid JSON ", 1)[1]]
    assert "1 wrong field type (first: " in logged[0] and f"{path}:3: 'text' must be a string" in logged[0]


# ---------------------------------------------------------------------------------------------- prepare_data
def test_prepare_data_reads_every_format(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    records = [ALPACA, SHAREGPT, CHAT_TEXT, {"text": "plain text"}]
    for src in (write_jsonl(tmp_path / "all.jsonl", records), write_parquet(tmp_path / "all.parquet", records)):
        result = prepare(src, tmp_path / src.stem / "data")
        assert result.returncode == 0, result.stderr
        data = BinIdxDataset(tmp_path / src.stem / "data")
        docs = read_text_docs(src, tokenizer)
        assert data.num_docs == 4 and [data.get(i).tolist() for i in range(4)] == [d.tolist() for d in docs]
        assert tokenizer.decode(data.get(0).tolist()) == "Instruction: Translate to French.\n\nInput: cat\n\n" \
                                                         "Response: chat\n\n"


def test_prepare_data_bad_records(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [ALPACA, "{oops", {"conversations": [{"from": "bot", "value": "x"}]},
                                              CHAT_TEXT])
    stopped = prepare(src, tmp_path / "stop")
    assert stopped.returncode == 1 and "in.jsonl:2: not valid JSON" in stopped.stderr
    assert "--skip_bad_records" in stopped.stderr and not list(tmp_path.glob("stop*"))
    skipped = prepare(src, tmp_path / "skip", "--skip_bad_records")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 2 of 4 records: 1 invalid JSON (first: " in skipped.stderr
    assert "1 unknown role (first: " in skipped.stderr
    assert "in.jsonl:3: conversations[0] has from 'bot'" in skipped.stderr
    assert "2 documents" in skipped.stdout and "(2 bad records skipped)" in skipped.stdout
    assert BinIdxDataset(tmp_path / "skip").num_docs == 2
    assert prepare(src, tmp_path / "skip0", "--skip_bad_records", "0").returncode == 1
