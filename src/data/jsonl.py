"""jsonl readers: plain text records and SFT records rendered in the RWKV World chat format with loss masks.

Record kinds (one JSON object per line; blank lines are skipped):
    text:     {"text": str}
    prompt:   {"prompt": str, "response": str}
    messages: {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Chat rendering: system -> "System: {content}\\n\\n", user -> "User: {content}\\n\\n",
assistant -> "Assistant:" + " {content}\\n\\n". The prompt side ends at "Assistant:" (as at inference time, where
the model generates the leading space), so the loss covers " {content}\\n\\n" of every assistant turn. Adjacent
text with the same mask is joined and tokenized as one string; prompt and response parts are tokenized
separately, so the mask boundary is exact. After the last turn the end-of-text token 0 is appended; its mask
is the mask of the last turn (1 when the conversation ends with an assistant reply, teaching the model to stop).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from src.data.tokenizer import Tokenizer
from src.errors import DataError

ROLE_PREFIX = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
SFT_KEYS = "'prompt' and 'response' (strings), or 'messages' (a list of {'role', 'content'})"

Segment = tuple[str, bool]  # (text, is_loss)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass an existing .jsonl file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line; save the file as UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e}); each line must be one JSON object") from e
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}; "
                    "each line must be one JSON object such as {\"text\": ...}"
                )
            yield line_no, record


def record_kind(record: dict[str, Any], where: str) -> str:
    """'text', 'prompt' or 'messages' from the record's keys."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "response" in record:
        return "prompt"
    if "text" in record:
        return "text"
    raise DataError(
        f"{where}: record has keys {sorted(record)}; expected 'text' (a string) or {SFT_KEYS}"
    )


def _string_field(record: dict[str, Any], key: str, where: str, expected: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key '{key}'; expected {expected}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}; expected {expected}")
    return value


def text_of(record: dict[str, Any], where: str) -> str:
    """The text of a {"text": ...} record."""
    return _string_field(record, "text", where, "'text' (a string)")


def chat_segments(record: dict[str, Any], where: str) -> list[Segment]:
    """Render a prompt/response or messages record as (text, is_loss) segments, adjacent equal masks joined."""
    kind = record_kind(record, where)
    if kind == "prompt":
        turns = [
            ("user", _string_field(record, "prompt", where, SFT_KEYS)),
            ("assistant", _string_field(record, "response", where, SFT_KEYS)),
        ]
    elif kind == "messages":
        turns = _messages_turns(record["messages"], where)
    else:
        raise DataError(f"{where}: a plain 'text' record cannot be used for SFT; expected {SFT_KEYS}")
    segments: list[Segment] = []
    for role, content in turns:
        if role == "assistant":
            _append(segments, ROLE_PREFIX[role], False)
            _append(segments, f" {content}\n\n", True)
        else:
            _append(segments, f"{ROLE_PREFIX[role]} {content}\n\n", False)
    return segments


def _messages_turns(messages: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLE_PREFIX:
            raise DataError(f"{where}: messages[{i}] has role {role!r}; expected one of {sorted(ROLE_PREFIX)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}] needs a string 'content', got {type(content).__name__}")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to train on")
    return turns


def _append(segments: list[Segment], text: str, is_loss: bool) -> None:
    if segments and segments[-1][1] == is_loss:
        segments[-1] = (segments[-1][0] + text, is_loss)
    else:
        segments.append((text, is_loss))


def plain_text(record: dict[str, Any], where: str) -> str:
    """Any record as one string: the text itself, or the rendered chat without masks (for binidx files)."""
    if record_kind(record, where) == "text":
        return text_of(record, where)
    return "".join(text for text, _ in chat_segments(record, where))


def tokenize_segments(segments: list[Segment], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (int32) and loss mask (uint8, 1 = train on this token) of the segments, plus the end token."""
    tokens: list[int] = []
    mask: list[int] = []
    for text, is_loss in segments:
        ids = tokenizer.encode(text)
        tokens.extend(ids)
        mask.extend([int(is_loss)] * len(ids))
    tokens.append(tokenizer.eos_id)
    mask.append(int(segments[-1][1]))
    return np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def document_tokens(text: str, tokenizer: Tokenizer, where: str) -> list[int]:
    """The tokens of one document followed by the end-of-text token; a DataError names `where` (file:line)."""
    try:
        ids = tokenizer.encode(text)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    ids.append(tokenizer.eos_id)
    return ids


def read_text_docs(path: str | os.PathLike, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Tokens (int32) of each {"text": ...} record of a jsonl file, each followed by the end-of-text token."""
    docs = []
    for line_no, record in iter_jsonl(path):
        where = f"{path}:{line_no}"
        docs.append(np.asarray(document_tokens(text_of(record, where), tokenizer, where), dtype=np.int32))
    if not docs:
        raise DataError(f"{path}: no records (the file is empty or blank); add lines like {{\"text\": \"...\"}}")
    return docs


def read_sft_docs(path: str | os.PathLike, tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) per record of a prompt/response or messages jsonl file."""
    docs = []
    for line_no, record in iter_jsonl(path):
        where = f"{path}:{line_no}"
        segments = chat_segments(record, where)
        try:
            docs.append(tokenize_segments(segments, tokenizer))
        except DataError as e:
            raise DataError(f"{where}: {e}") from e
    if not docs:
        raise DataError(f"{path}: no records (the file is empty or blank); add lines with {SFT_KEYS}")
    return docs
