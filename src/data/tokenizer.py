"""The RWKV World tokenizer (vocabulary ``rwkv_vocab_v20230424``), wrapped from the ``pyrwkv_tokenizer`` package.

Encoding is done by the package (a Rust greedy longest-match trie, token-for-token equal to the reference
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``). Decoding goes through a byte table read from the package's own
vocabulary file, because the package's ``decode`` panics on token sequences that end inside a UTF-8 character.
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import pyrwkv_tokenizer

from src.errors import DataError


class Tokenizer(Protocol):
    """What the data pipeline (encode) and evaluation (decode) need from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _read_vocab_bytes(vocab_file: Path) -> list[bytes]:
    """Read ``idx <python literal> byte_len`` lines into a table id -> bytes (id 0 maps to b"")."""
    table: dict[int, bytes] = {0: b""}
    with open(vocab_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first_space = line.index(" ")
            last_space = line.rindex(" ")
            token_id = int(line[:first_space])
            value = ast.literal_eval(line[first_space + 1 : last_space])
            token = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(token, bytes) or len(token) != int(line[last_space + 1 :]):
                raise DataError(
                    f"{vocab_file}:{line_no}: vocabulary entry does not match its declared byte length; "
                    "reinstall pyrwkv_tokenizer"
                )
            table[token_id] = token
    size = max(table) + 1
    if sorted(table) != list(range(size)):
        raise DataError(f"{vocab_file}: vocabulary ids are not contiguous; reinstall pyrwkv_tokenizer")
    return [table[i] for i in range(size)]


class WorldTokenizer:
    """RWKV World tokenizer. Token 0 is end-of-text / document separator and decodes to nothing.

    ``vocab_size`` is the model's embedding size (65536); the vocabulary file defines ids 1..65529,
    ids 65530..65535 exist in the model but are never produced by ``encode``.
    """

    vocab_size: int = 65536
    eos_id: int = 0

    def __init__(self) -> None:
        self._tokenizer = pyrwkv_tokenizer.RWKVTokenizer()
        self._id_to_bytes: list[bytes] | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never contains ``eos_id``."""
        try:
            return self._tokenizer.encode(text)
        except UnicodeEncodeError as e:
            raise DataError(
                f"text is not valid Unicode ({e.reason} at character {e.start}); "
                "remove lone surrogates (e.g. an unpaired '\\ud800' escape in JSON) from the data"
            ) from e

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts at once (faster for large inputs)."""
        try:
            return self._tokenizer.encode_batch(list(texts))
        except UnicodeEncodeError as e:
            raise DataError(
                f"text is not valid Unicode ({e.reason}); remove lone surrogates from the data"
            ) from e

    def token_bytes(self) -> list[bytes]:
        """The bytes of every token id of the vocabulary file (id 0: b"")."""
        if self._id_to_bytes is None:
            self._id_to_bytes = _read_vocab_bytes(Path(self._tokenizer.vocab_filepath))
        return self._id_to_bytes

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw UTF-8 bytes of ``ids`` (a token may hold part of a character)."""
        table = self.token_bytes()
        pieces = []
        for position, token_id in enumerate(ids):
            token_id = int(token_id)
            if not 0 <= token_id < len(table):
                raise DataError(
                    f"token id {token_id} at position {position} is not in the World vocabulary "
                    f"(valid ids are 0..{len(table) - 1}); the tokens come from another tokenizer or are corrupt"
                )
            pieces.append(table[token_id])
        return b"".join(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bytes that do not form complete UTF-8 characters become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
