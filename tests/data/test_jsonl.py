"""jsonl readers: chat rendering, exact response masks, clear errors for bad lines, fuzzing."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.data.jsonl import chat_segments, plain_text, read_sft_docs, read_text_docs
from src.data.tokenizer import WorldTokenizer
from src.errors import DataError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s."""
    padded = np.concatenate(([0], mask.astype(int), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_prompt_response_mask_selects_exactly_the_response(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    prompt, response = "What is the capital of France? 请回答。", "Paris 🎉 is the capital.\nIt is big."
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": prompt, "response": response})])
    [(tokens, mask)] = read_sft_docs(path, tokenizer)
    assert tokens.shape == mask.shape
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert runs(mask) == [(int(np.argmax(mask)), len(mask))]
    assert tokens[-1] == 0 and mask[-1] == 1
    assert tokenizer.decode(tokens[mask == 1]) == f" {response}\n\n"
    assert tokenizer.decode(tokens[mask == 0]) == f"User: {prompt}\n\nAssistant:"
    assert tokens[mask == 0].tolist() == tokenizer.encode(f"User: {prompt}\n\nAssistant:")


def test_multi_turn_masks_every_assistant_turn(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": messages})])
    [(tokens, mask)] = read_sft_docs(path, tokenizer)
    masked_runs = runs(mask)
    assert [tokenizer.decode(tokens[a:b]) for a, b in masked_runs] == [" Hello!\n\n", " 4\n\n"]
    assert masked_runs[-1][1] == len(tokens) and tokens[-1] == 0
    assert tokenizer.decode(tokens) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: 4\n\n"
    )
    first_prompt = tokens[: masked_runs[0][0]].tolist()
    assert first_prompt == tokenizer.encode("System: Be brief.\n\nUser: Hi\n\nAssistant:")


def test_conversation_ending_with_user_does_not_train_the_end_token(tokenizer: WorldTokenizer) -> None:
    messages = [{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Thanks"}]
    segments = chat_segments({"messages": messages}, "x")
    assert segments == [("Assistant:", False), (" Welcome.\n\n", True), ("User: Thanks\n\n", False)]


def test_text_records(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "one"}), "", "  ", json.dumps({"text": "两"})])
    docs = read_text_docs(path, tokenizer)
    assert [d.tolist() for d in docs] == [tokenizer.encode("one") + [0], tokenizer.encode("两") + [0]]


def test_utf8_bom_is_accepted(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode("utf-8") + b'{"text": "x"}\n')
    assert read_text_docs(path, tokenizer)[0].tolist() == tokenizer.encode("x") + [0]


def test_plain_text_renders_chat() -> None:
    assert plain_text({"prompt": "a", "response": "b"}, "x") == "User: a\n\nAssistant: b\n\n"
    assert plain_text({"text": "t"}, "x") == "t"


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "a", "response": ', r"bad\.jsonl:3: not valid JSON"),
        ('["a", "b"]', r"bad\.jsonl:3: expected a JSON object, got list"),
        ('{"prompt": "a"}', r"bad\.jsonl:3: missing key 'response'; expected 'prompt' and 'response'"),
        ('{"response": "a"}', r"bad\.jsonl:3: missing key 'prompt'"),
        ('{"prompt": 1, "response": "a"}', r"bad\.jsonl:3: 'prompt' must be a string, got int"),
        ('{"question": "a"}', r"bad\.jsonl:3: record has keys \['question'\]; expected 'text'"),
        ('{"text": "plain"}', r"bad\.jsonl:3: a plain 'text' record cannot be used for SFT"),
        ('{"messages": []}', r"bad\.jsonl:3: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"bad\.jsonl:3: messages\[0\] has role 'bot'"),
        ('{"messages": [{"role": ["user"], "content": "x"}]}', r"bad\.jsonl:3: messages\[0\] has role \['user'\]"),
        ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:3: messages\[0\] needs a string 'content'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:3: 'messages' has no assistant turn"),
        ('{"prompt": "\\ud800", "response": "a"}', r"bad\.jsonl:3: text is not valid Unicode"),
    ],
)
def test_bad_sft_line(tmp_path: Path, tokenizer: WorldTokenizer, line: str, match: str) -> None:
    good = json.dumps({"prompt": "p", "response": "r"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(DataError, match=match):
        read_sft_docs(path, tokenizer)


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json}", r"bad\.jsonl:2: not valid JSON"),
        ('{"txt": "a"}', r"bad\.jsonl:2: record has keys \['txt'\]; expected 'text'"),
        ('{"text": null}', r"bad\.jsonl:2: 'text' must be a string, got NoneType"),
        ('{"text": "\\udc00"}', r"bad\.jsonl:2: text is not valid Unicode"),
        ("[" * 100000, r"bad\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_text_line(tmp_path: Path, tokenizer: WorldTokenizer, line: str, match: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', line])
    with pytest.raises(DataError, match=match):
        read_text_docs(path, tokenizer)


def test_invalid_utf8_names_the_line(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8"):
        read_text_docs(path, tokenizer)


def test_missing_and_empty_files(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_text_docs(tmp_path / "nope.jsonl", tokenizer)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_text_docs(empty, tokenizer)
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_sft_docs(empty, tokenizer)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", "system", "bot"]) | json_values,
                  "content": st.text(max_size=20) | json_values},
)
record = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=30) | json_values,
        "prompt": st.text(max_size=30) | json_values,
        "response": st.text(max_size=30) | json_values,
        "messages": st.lists(message, max_size=4) | json_values,
    },
)
line = st.one_of(
    record.map(json.dumps).map(str.encode),
    json_values.map(json.dumps).map(str.encode),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=50, deadline=None)
@given(st.lists(line, max_size=5), st.sampled_from(["text", "sft"]))
def test_fuzz_readers_load_or_raise_data_error(tokenizer: WorldTokenizer, lines: list[bytes], mode: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            if mode == "text":
                docs = read_text_docs(path, tokenizer)
                assert all(d[-1] == 0 for d in docs)
            else:
                for tokens, mask in read_sft_docs(path, tokenizer):
                    assert tokens.shape == mask.shape and tokens[-1] == 0 and mask.max() == 1
        except DataError:
            pass
