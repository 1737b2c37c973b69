"""Loss masking by role markers: the exact rule on text, the same rule on binidx tokens, role-name settings."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.data.binidx import BinIdxWriter
from src.data.dataset import BinIdxDocumentDataset, DocumentDataset, build_datasets, detect_data_type
from src.data.jsonl import read_sft_docs, tokenize_segments
from src.data.prepare import records_to_binidx
from src.data.roles import DEFAULT_ROLE_MARKERS, RoleMarkers, TokenMarkers
from src.data.sources import BadRecords
from src.data.tokenizer import WorldTokenizer
from src.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = RoleMarkers()


@pytest.fixture(scope="module")
def markers(tokenizer: WorldTokenizer) -> TokenMarkers:
    return TokenMarkers(ROLES, tokenizer)


def encode_pieces(tokenizer: WorldTokenizer, pieces: list[tuple[str, int]], end_mask: int) -> tuple[list, list]:
    """Tokens and mask built by hand: each piece tokenized on its own, then the end token 0."""
    tokens, mask = [], []
    for text, m in pieces:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [m] * len(ids)
    return tokens + [0], mask + [end_mask]


def text_mask(text: str, tokenizer: WorldTokenizer, roles: RoleMarkers = ROLES) -> tuple[np.ndarray, np.ndarray]:
    segments, _ = roles.segments(text)
    return tokenize_segments(segments, tokenizer)


# ---------------------------------------------------------------------------------------------- the text rule
def test_community_chat_masks_exactly_the_assistant_turns_and_their_ends(tokenizer: WorldTokenizer) -> None:
    text = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: 4"
    tokens, mask = text_mask(text, tokenizer)
    expected = encode_pieces(tokenizer, [("System: Be brief.\n\nUser: Hi\n\nAssistant:", 0), (" Hello!\n\n", 1),
                                         ("User: 2+2?\n\nAssistant:", 0), (" 4", 1)], end_mask=1)
    assert (tokens.tolist(), mask.tolist()) == expected
    assert tokens.tolist() == tokenizer.encode(text) + [0]  # the pieces tokenize as the whole text does here


def test_instruction_input_response(tokenizer: WorldTokenizer) -> None:
    text = "Instruction: Translate.\n\nInput: chat\n\nResponse: cat\n\n"
    tokens, mask = text_mask(text, tokenizer)
    assert (tokens.tolist(), mask.tolist()) == encode_pieces(
        tokenizer, [("Instruction: Translate.\n\nInput: chat\n\nResponse:", 0), (" cat\n\n", 1)], end_mask=1)


@pytest.mark.parametrize("text, pieces, end", [
    # a blank line not followed by a marker stays inside the answer
    ("User: q\n\nAssistant: a\n\nb\n\nUser: r", [("User: q\n\nAssistant:", 0), (" a\n\nb\n\n", 1), ("User: r", 0)], 0),
    # text before the first marker is prompt; markers in mid-line, other case or longer names are not markers
    ("Intro\n\nUser: say Assistant: x\n\nassistant: no\n\nUsername: no\n\nAssistant:yes",
     [("Intro\n\nUser: say Assistant: x\n\nassistant: no\n\nUsername: no\n\nAssistant:", 0), ("yes", 1)], 1),
    # three newlines before a marker: the last two are the separator, all belong to the turn before
    ("User: q\n\n\nAssistant: a\n\n\nUser: r\n\n", [("User: q\n\n\nAssistant:", 0), (" a\n\n\n", 1),
                                                     ("User: r\n\n", 0)], 0),
    # an empty last assistant turn still trains the end token
    ("User: q\n\nAssistant:", [("User: q\n\nAssistant:", 0)], 1),
    # the conversation may open with the assistant
    ("Assistant: Welcome.\n\nUser: Thanks", [("Assistant:", 0), (" Welcome.\n\n", 1), ("User: Thanks", 0)], 0),
])
def test_rule_edge_cases(tokenizer: WorldTokenizer, text: str, pieces: list[tuple[str, int]], end: int) -> None:
    segments, has_assistant = ROLES.segments(text)
    assert has_assistant
    assert "".join(s for s, _ in segments) == text
    tokens, mask = tokenize_segments(segments, tokenizer)
    assert (tokens.tolist(), mask.tolist()) == encode_pieces(tokenizer, pieces, end)


def test_text_without_assistant_turn() -> None:
    assert ROLES.segments("User: only a question\n\nSystem: x") == ([("User: only a question\n\nSystem: x", False)],
                                                                      False)
    assert ROLES.segments("plain prose. Assistant: mid-line") == ([("plain prose. Assistant: mid-line", False)], False)
    assert ROLES.segments("") == ([("", False)], False)


def test_custom_role_names(tokenizer: WorldTokenizer) -> None:
    roles = RoleMarkers.parse(["user=Question,Context", "assistant=Answer"])
    assert roles.user == ("Question", "Context") and roles.assistant == ("Answer",)
    tokens, mask = text_mask("Question: 1+1?\n\nAnswer: 2\n\nQuestion: and?\n\nAnswer: 3", tokenizer, roles)
    assert tokenizer.decode(tokens[mask == 1].tolist()) == " 2\n\n 3"
    assert RoleMarkers.parse(["assistant=Bot"]).user == RoleMarkers().user  # a group left out keeps its default
    assert RoleMarkers.parse(None) == RoleMarkers.parse(list(DEFAULT_ROLE_MARKERS)) == RoleMarkers()
    assert RoleMarkers.parse(" ".join(DEFAULT_ROLE_MARKERS)) == RoleMarkers()  # a YAML string
    assert RoleMarkers.parse(RoleMarkers().spec()) == RoleMarkers()


@pytest.mark.parametrize("spec, match", [
    (["bot=Assistant"], "expected user=Name"),
    (["assistant"], "expected user=Name"),
    (["assistant=A:B"], "without ':'"),
    (["assistant=A,"], "must be non-empty"),
    (["assistant=A", "assistant=B"], "twice"),
    (["user=User,Assistant"], "both a user and an assistant role"),
    ([1], "must be strings"),
])
def test_bad_role_specs(spec: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RoleMarkers.parse(spec)


# ---------------------------------------------------------------------------------------------- the token rule
@pytest.mark.parametrize("text", [
    "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: 4",
    "User: q\n\nAssistant: a\n\nb\n\nUser: r",
    "Intro\n\nUser: say Assistant: x\n\nassistant: no\n\nUsername: no\n\nAssistant:yes",
    "User: q\n\n\nAssistant: a\n\n\nUser: r\n\n",
    "Instruction: Translate.\n\nInput: chat\n\nResponse: cat\n\n",
    "Assistant: 你好 🎉\n\nUser: 谢谢\n\n",
    "User:**bold**\n\nAssistant:**Sure**\n\nUser::x \n\nAssistant: y",  # ':' merged into ':**', '::'
])
def test_token_rule_matches_text_rule(tokenizer: WorldTokenizer, markers: TokenMarkers, text: str) -> None:
    tokens, mask = text_mask(text, tokenizer)
    turns = markers.scan(tokens, np.array([0, len(tokens)]))
    assert turns.mask(0, len(tokens)).tolist() == mask.tolist()
    whole = np.asarray(tokenizer.encode(text) + [0])  # as RWKV-LM's make_data tokenizes: the whole text at once
    if whole.tolist() == tokens.tolist():
        assert markers.scan(whole, np.array([0, len(whole)])).mask(0, len(whole)).tolist() == mask.tolist()


def test_token_rule_on_text_tokenized_whole_counts_a_merged_colon_as_marker(tokenizer: WorldTokenizer,
                                                                             markers: TokenMarkers) -> None:
    tokens = np.asarray(tokenizer.encode("User:**q**\n\nAssistant:**Sure**") + [0])
    assert [tokenizer.decode([t]) for t in tokens[:2]] == ["User", ":**"]
    mask = markers.scan(tokens, np.array([0, len(tokens)])).mask(0, len(tokens))
    assert tokenizer.decode(tokens[mask == 1].tolist()) == "Sure**" and mask[-1] == 1


def test_token_rule_over_several_documents_and_inner_end_tokens(tokenizer: WorldTokenizer,
                                                                markers: TokenMarkers) -> None:
    a, ma = text_mask("User: q\n\nAssistant: a", tokenizer)
    b, mb = text_mask("Assistant: b\n\nUser: c", tokenizer)
    plain = np.asarray(tokenizer.encode("no turns here") + [0])
    # one idx sequence holding two documents (token 0 inside it), then a plain document, then a
    flat = np.concatenate((a, b, plain, a))
    offsets = np.array([0, len(a) + len(b), len(a) + len(b) + len(plain), len(flat)])
    turns = markers.scan(flat, offsets)
    assert turns.mask(0, len(a) + len(b)).tolist() == ma.tolist() + mb.tolist()
    assert not turns.mask(offsets[1], offsets[2]).any()
    assert turns.mask(offsets[2], offsets[3]).tolist() == ma.tolist()
    assert turns.assistant_docs(offsets).tolist() == [True, False, True]
    # truncation: the mask of a prefix is the prefix of the mask
    assert turns.mask(0, 5).tolist() == ma[:5].tolist()
    assert turns.docs_with_loss(offsets, ctx_len=2).tolist() == [False, False, False]
    assert turns.docs_with_loss(offsets, ctx_len=64).tolist() == [True, False, True]


chat_words = st.sampled_from(["hi", "a b", "x\n\ny", "\n", "User", "Assistant", ":", " ", "你", "🎉", "ok."])
turn = st.tuples(st.sampled_from(ROLES.user + ROLES.assistant), st.lists(chat_words, max_size=4).map("".join))


@settings(max_examples=40, deadline=None)
@given(st.lists(turn, min_size=1, max_size=4), st.sampled_from(["", "\n\n", "\n"]))
def test_token_rule_matches_text_rule_on_random_chats(tokenizer: WorldTokenizer, markers: TokenMarkers,
                                                      turns: list[tuple[str, str]], tail: str) -> None:
    text = "\n\n".join(f"{role}: {content}" for role, content in turns) + tail
    tokens, mask = text_mask(text, tokenizer)
    scanned = markers.scan(tokens, np.array([0, len(tokens)]))
    assert scanned.mask(0, len(tokens)).tolist() == mask.tolist()


# ---------------------------------------------------------------------------------------------- binidx SFT
CHATS = [
    "User: What is 2+2?\n\nAssistant: 4",
    "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Name a colour.\n\nAssistant: Red.\n\n",
    "Instruction: Say hi.\n\nResponse: hi",
    "Assistant: I open.\n\nUser: ok",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def prepare(src: Path, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--input", str(src), "--output_prefix",
                           str(prefix), "--quiet", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_binidx_sft_gives_the_jsonl_sft_masks(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", [{"text": t} for t in CHATS])
    result = prepare(src, tmp_path / "chat")
    assert result.returncode == 0, result.stderr
    assert detect_data_type(src) == "sft" and detect_data_type(tmp_path / "chat") == "binidx"
    from_jsonl = build_datasets(src, "sft", 64, tokenizer, seed=3)
    from_binidx = build_datasets(tmp_path / "chat", "sft", 64, tokenizer, seed=3)
    assert isinstance(from_jsonl.train, DocumentDataset) and isinstance(from_binidx.train, BinIdxDocumentDataset)
    docs = read_sft_docs(src, tokenizer)
    assert len(from_binidx.train) == len(docs) == len(CHATS)
    for i in range(len(CHATS)):
        assert from_binidx.train.document(i)[0].tolist() == docs[i][0].tolist()
        assert from_binidx.train.document(i)[1].tolist() == docs[i][1].tolist()
        x, y = from_jsonl.train[i], from_binidx.train[i]
        assert all(bool((x[k] == y[k]).all()) for k in ("input", "target", "mask"))
    # plain binidx windows of the same file train on every token
    windows = build_datasets(tmp_path / "chat", "binidx", 16, None, seed=0, num_samples=2)
    assert windows.train[0]["mask"].sum() == 16


def test_binidx_sft_validation_split_and_truncation(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": f"User: question {i}\n\nAssistant: answer {i}"}
                                             for i in range(10)])
    assert prepare(src, tmp_path / "c").returncode == 0
    built = build_datasets(tmp_path / "c.bin", "sft", 8, tokenizer, seed=0, val_fraction=0.2)
    assert len(built.train) == 8 and len(built.val) == 2
    sample = built.val[0]
    assert sample["mask"].sum() > 0 and sample["input"].shape == (8,)
    with pytest.raises(DataError, match="no training document has a response token within its first 3"):
        build_datasets(tmp_path / "c", "sft", 2, tokenizer, seed=0)


def test_binidx_documents_without_assistant_turn(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    docs = [tokenizer.encode(t) + [0] for t in ["User: a\n\nAssistant: b", "just text", "User: q", "Assistant: c"]]
    with BinIdxWriter(tmp_path / "d") as writer:
        for doc in docs:
            writer.add_document(doc)
    with pytest.raises(DataError, match=r"d\.bin: document 1 \(tokens \d+\.\.\d+\) has no assistant turn: none of "
                                        r"'Assistant:' or 'Response:'.*--skip_bad_records"):
        build_datasets(tmp_path / "d", "sft", 32, tokenizer, seed=0)
    logged: list[str] = []
    built = build_datasets(tmp_path / "d", "sft", 32, tokenizer, seed=0, skip_bad_records=True, log=logged.append)
    assert built.train.chat.doc_ids.tolist() == [0, 3]
    assert logged == built.report and len(logged) == 1
    assert "skipped 2 of 4 records: 2 no assistant turn (first: " in logged[0] and "document 1 " in logged[0]
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_datasets(tmp_path / "d", "sft", 32, None, seed=0)


def test_role_markers_reach_binidx_and_text(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", [{"text": "Q: 1+1?\n\nA: 2"}, {"text": "Q: 2+2?\n\nA: 4"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:1: a plain 'text' record cannot be used for SFT"):
        build_datasets(src, "sft", 32, tokenizer, seed=0)
    spec = ["user=Q", "assistant=A"]
    assert detect_data_type(src) == "jsonl" and detect_data_type(src, spec) == "sft"
    assert prepare(src, tmp_path / "qa", "--role_markers", *spec).returncode == 0
    for path in (src, tmp_path / "qa"):
        built = build_datasets(path, "sft", 32, tokenizer, seed=0, role_markers=spec)
        masked = [tokenizer.decode(built.train.document(i)[0][built.train.document(i)[1] == 1].tolist())
                  for i in range(2)]
        assert sorted(masked) == [" 2", " 4"]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(turn, min_size=1, max_size=3), min_size=1, max_size=4))
def test_prepared_binidx_masks_equal_jsonl_masks(tokenizer: WorldTokenizer, chats: list) -> None:
    texts = ["\n\n".join(f"{role}: {content}" for role, content in chat) for chat in chats]
    with tempfile.TemporaryDirectory() as folder:
        src = write_jsonl(Path(folder) / "c.jsonl", [{"text": t} for t in texts])
        records_to_binidx(src, Path(folder) / "c", show_progress=False)
        try:
            docs = read_sft_docs(src, tokenizer, bad=BadRecords(skip=True))
        except DataError:  # no chat has an assistant turn
            docs = []
        try:
            built = build_datasets(Path(folder) / "c", "sft", 512, tokenizer, 0, skip_bad_records=True, log=None)
        except DataError:
            assert not docs
            return
        assert len(built.train) == len(docs)
        for i, (tokens, mask) in enumerate(docs):
            got_tokens, got_mask = built.train.document(i)
            assert got_tokens.tolist() == tokens.tolist() and got_mask.tolist() == mask.tolist()
