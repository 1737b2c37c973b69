"""WorldTokenizer: token-for-token parity with the rwkv package's reference TRIE_TOKENIZER, and decoding."""
from __future__ import annotations

import os

import pytest
import rwkv
from hypothesis import given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from src.data.tokenizer import WorldTokenizer
from src.errors import DataError

SAMPLES = [
    "Hello, world! This is a test of the RWKV World tokenizer.",
    "人工智能是计算机科学的一个分支。我们今天去公园散步吧！",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x > 0:\n\t\tpass\n",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 and flags 🇯🇵🇫🇷 plus ✓ ∑ ∞",
    "    leading spaces, trailing spaces    \n\n\n   \t\t  \r\n  ",
    "a\n\nb\n\n\nc\r\nd",
    "Mixed: English, 日本語のテキスト, русский текст, العربية, हिन्दी, 한국어 — and “quotes”.",
    "User: what is 2+2?\n\nAssistant: 4\n\n",
    "\x00\x01 control chars \x7f and a zero-width\u200bspace",
    "x" * 300 + " " * 200 + "-" * 90,
    "",
]


@pytest.fixture(scope="module")
def reference() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_reference(tokenizer: WorldTokenizer, reference: TRIE_TOKENIZER, text: str) -> None:
    assert tokenizer.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode(tokenizer: WorldTokenizer, reference: TRIE_TOKENIZER, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == reference.decodeBytes(ids)


def test_encode_batch_matches_encode(tokenizer: WorldTokenizer) -> None:
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(s) for s in SAMPLES]


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_random_text_matches_reference(tokenizer: WorldTokenizer, reference: TRIE_TOKENIZER, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == text


def test_constants_and_eos(tokenizer: WorldTokenizer) -> None:
    assert tokenizer.vocab_size == 65536
    assert tokenizer.eos_id == 0
    assert 0 not in tokenizer.encode("\x00 text with a NUL \x00")
    assert tokenizer.decode([0]) == ""
    assert tokenizer.decode(tokenizer.encode("ab") + [0] + tokenizer.encode("cd")) == "abcd"


def test_decode_partial_character_is_replaced_not_crashing(tokenizer: WorldTokenizer) -> None:
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_decode_rejects_ids_outside_vocabulary(tokenizer: WorldTokenizer) -> None:
    with pytest.raises(DataError, match="65530 at position 1"):
        tokenizer.decode([1, 65530])
    with pytest.raises(DataError, match="-1"):
        tokenizer.decode([-1])


def test_encode_rejects_lone_surrogate(tokenizer: WorldTokenizer) -> None:
    with pytest.raises(DataError, match="surrogate"):
        tokenizer.encode("ok \ud800 bad")
