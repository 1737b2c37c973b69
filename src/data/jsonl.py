"""Records (jsonl lines or Parquet rows, read by src/data/sources.py) rendered in the RWKV World chat format, with
loss masks.

Record kinds, recognised by their keys (the first match in this order decides):
    messages:      {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    conversations: ShareGPT, {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}
    alpaca:        {"instruction": str, "input": str (optional, may be empty or null), "output": str}
    prompt:        {"prompt": str, "response": str}
    text:          {"text": str}, the community SFT text format: roles by markers (src/data/roles.py)
Turn entries of messages and conversations may use role/content or from/value keys; speakers (any case) human
and user are the user, gpt, assistant, chatgpt and model the assistant, system the system. A top-level "system"
string (ShareGPT and Alpaca variants carry one) adds a System turn first. An Alpaca file with a pre-rendered
"text" column is read from its instruction/input/output.

Rendering: system -> "System: {content}\\n\\n", user -> "User: {content}\\n\\n", assistant -> "Assistant:" +
" {content}\\n\\n"; Alpaca -> "Instruction: {instruction}\\n\\n" + "Input: {input}\\n\\n" (when the input is not
empty) + "Response:" + " {output}\\n\\n" (RWKV's instruction prompt). The prompt side ends at the marker (as at
inference, where the model generates the leading space), so the loss covers " {content}\\n\\n" of every
assistant turn: the same rule the role markers give for text (src/data/roles.py), which "text" records follow.
Structured records are rendered piece by piece, not re-parsed, so a blank line inside a message never splits
it. Adjacent text with the same mask is joined and tokenized as one string; prompt and response pieces are
tokenized separately, so the mask boundary is exact. After the last turn the end-of-text token 0 is appended;
its mask is the mask of the last turn (1 when the conversation ends with an assistant reply, teaching the model
to stop).

Every problem with a record is a ``RecordError`` naming the record (``file:line`` or ``file row N``) and the fix;
``BadRecords`` (src/data/sources.py) raises it or, with --skip_bad_records, counts it and leaves the record out.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from src.data.roles import RoleMarkers, Segment, append_segment
from src.data.sources import BadRecords, RecordError, iter_jsonl, iter_records
from src.data.tokenizer import Tokenizer
from src.errors import DataError

__all__ = ["iter_jsonl", "record_kind", "chat_segments", "plain_text", "record_segments", "tokenize_segments",
           "record_tokens", "document_tokens", "read_text_docs", "read_sft_docs", "Segment"]

ROLE_PREFIX = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
SPEAKERS = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "chatgpt": "assistant", "model": "assistant"}
SFT_KEYS = ("'prompt' and 'response' (strings), 'messages' (a list of {'role', 'content'}), 'conversations' "
            "(ShareGPT: a list of {'from', 'value'}) or 'instruction' and 'output' (Alpaca)")
ALPACA_KEYS = "'instruction', optional 'input' and 'output' (strings; Alpaca)"
TURN_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}


def record_kind(record: dict[str, Any], where: str) -> str:
    """'messages', 'conversations', 'alpaca', 'prompt' or 'text' from the record's keys."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "conversations"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "response" in record:
        return "prompt"
    if "text" in record:
        return "text"
    if not record:
        raise RecordError(f"{where}: empty record (no field, or every field null); expected 'text' (a string) or "
                          f"{SFT_KEYS}; fill it in or leave it out", "empty record")
    raise RecordError(f"{where}: record has keys {sorted(record)}; expected 'text' (a string) or {SFT_KEYS}; "
                      "rename the fields", "unknown record keys")


def _string_field(record: dict[str, Any], key: str, where: str, expected: str) -> str:
    if key not in record:
        raise RecordError(f"{where}: missing key '{key}'; expected {expected}", "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"{where}: '{key}' must be a string, got {type(value).__name__}; expected {expected}",
                          "wrong field type")
    return value


def text_of(record: dict[str, Any], where: str) -> str:
    """The text of a {"text": ...} record."""
    return _string_field(record, "text", where, "'text' (a string)")


def _system_turn(record: dict[str, Any], where: str) -> list[tuple[str, str]]:
    if "system" not in record:
        return []
    system = _string_field(record, "system", where, "a top-level 'system' string (or none)")
    return [("system", system)] if system else []


def _turns(items: Any, key: str, where: str) -> list[tuple[str, str]]:
    """(role, content) of each entry of a messages/conversations list."""
    role_key, content_key = TURN_KEYS[key]
    if not isinstance(items, list) or not items:
        raise RecordError(f"{where}: '{key}' must be a non-empty list of {{'{role_key}', '{content_key}'}} objects",
                          "empty conversation" if isinstance(items, list) else "wrong field type")
    turns = []
    for i, entry in enumerate(items):
        if not isinstance(entry, dict):
            raise RecordError(f"{where}: {key}[{i}] must be an object with '{role_key}' and '{content_key}'",
                              "wrong field type")
        names = ("role", "content") if "role" in entry or "content" in entry else (
            ("from", "value") if "from" in entry or "value" in entry else (role_key, content_key))
        role = entry.get(names[0])
        if not isinstance(role, str) or role.lower() not in SPEAKERS:
            raise RecordError(
                f"{where}: {key}[{i}] has {names[0]} {role!r}; expected one of {sorted(SPEAKERS)}; rename the "
                "speaker or leave the record out", "unknown role")
        content = entry.get(names[1])
        if not isinstance(content, str):
            raise RecordError(f"{where}: {key}[{i}] needs a string '{names[1]}', got {type(content).__name__}",
                              "wrong field type")
        turns.append((SPEAKERS[role.lower()], content))
    return turns


def _chat(turns: list[tuple[str, str]]) -> list[Segment]:
    segments: list[Segment] = []
    for role, content in turns:
        if role == "assistant":
            append_segment(segments, ROLE_PREFIX[role], False)
            append_segment(segments, f" {content}\n\n", True)
        else:
            append_segment(segments, f"{ROLE_PREFIX[role]} {content}\n\n", False)
    return segments


def _alpaca(record: dict[str, Any], where: str) -> list[Segment]:
    instruction = _string_field(record, "instruction", where, ALPACA_KEYS)
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise RecordError(f"{where}: 'input' must be a string, got {type(extra).__name__}; expected {ALPACA_KEYS}",
                          "wrong field type")
    output = _string_field(record, "output", where, ALPACA_KEYS)
    segments = _chat(_system_turn(record, where))
    append_segment(segments, f"Instruction: {instruction}\n\n", False)
    if extra:
        append_segment(segments, f"Input: {extra}\n\n", False)
    append_segment(segments, "Response:", False)
    append_segment(segments, f" {output}\n\n", True)
    return segments


def record_segments(record: dict[str, Any], where: str, roles: RoleMarkers | None = None) -> tuple[
        list[Segment], bool]:
    """(prompt/loss pieces of any record, whether it has an assistant turn). "text" records are cut by ``roles``
    (a text without markers is one untrained piece); the others are rendered as the module describes."""
    kind = record_kind(record, where)
    if kind == "text":
        return (roles or RoleMarkers()).segments(text_of(record, where))
    if kind == "alpaca":
        return _alpaca(record, where), True
    if kind == "prompt":
        turns = [("user", _string_field(record, "prompt", where, SFT_KEYS)),
                 ("assistant", _string_field(record, "response", where, SFT_KEYS))]
    else:
        turns = _turns(record[kind], kind, where)
    turns = _system_turn(record, where) + turns
    return _chat(turns), any(role == "assistant" for role, _ in turns)


def chat_segments(record: dict[str, Any], where: str, roles: RoleMarkers | None = None) -> list[Segment]:
    """The (text, is_loss) pieces of a record for SFT; a RecordError when it has no assistant turn."""
    segments, has_assistant = record_segments(record, where, roles)
    if has_assistant:
        return segments
    kind = record_kind(record, where)
    if kind == "text":
        roles = roles or RoleMarkers()
        raise RecordError(
            f"{where}: a plain 'text' record cannot be used for SFT: it has no assistant turn ({roles.describe()} at "
            "the start of the text or after a blank line); write it as 'User: …\\n\\nAssistant: …' turns, set "
            "--role_markers to the role names the data uses, or train plain text with --data_type jsonl",
            "no assistant turn")
    raise RecordError(f"{where}: '{kind}' has no assistant turn, so there is nothing to train on; add the reply or "
                      "leave the record out", "no assistant turn")


def plain_text(record: dict[str, Any], where: str) -> str:
    """Any record as one string: the text itself, or the rendered chat without masks."""
    return "".join(text for text, _ in record_segments(record, where)[0])


def _encode(text: str, tokenizer: Tokenizer, where: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except DataError as e:
        raise RecordError(f"{where}: {e}", "invalid Unicode") from e


def tokenize_segments(segments: list[Segment], tokenizer: Tokenizer, where: str = "record") -> tuple[
        np.ndarray, np.ndarray]:
    """Tokens (int32) and loss mask (uint8, 1 = train on this token) of the segments, plus the end token."""
    tokens: list[int] = []
    mask: list[int] = []
    for text, is_loss in segments:
        ids = _encode(text, tokenizer, where)
        tokens.extend(ids)
        mask.extend([int(is_loss)] * len(ids))
    tokens.append(tokenizer.eos_id)
    mask.append(int(segments[-1][1]) if segments else 0)
    return np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def record_tokens(record: dict[str, Any], where: str, tokenizer: Tokenizer,
                  roles: RoleMarkers | None = None) -> np.ndarray:
    """Tokens (int32) of any record as one document, end token 0 included, without masks: what window training
    and binidx files hold. Chat text is tokenized in its prompt/response pieces, exactly as for SFT, so the same
    role markers are found again in the tokens."""
    return tokenize_segments(record_segments(record, where, roles)[0], tokenizer, where)[0]


def document_tokens(text: str, tokenizer: Tokenizer, where: str) -> list[int]:
    """The tokens of one document followed by the end-of-text token; a DataError names `where` (file:line)."""
    ids = _encode(text, tokenizer, where)
    ids.append(tokenizer.eos_id)
    return ids


def _no_records(path: str | os.PathLike, bad: BadRecords, expected: str) -> DataError:
    if bad.skipped:
        return DataError(f"no usable records: {bad.summary(path)}")
    return DataError(f"{path}: no records (the file is empty or blank); add records with {expected}")


def read_text_docs(path: str | os.PathLike, tokenizer: Tokenizer, roles: RoleMarkers | None = None,
                   bad: BadRecords | None = None) -> list[np.ndarray]:
    """Tokens (int32) of each record of a jsonl/Parquet file as one document (``record_tokens``)."""
    bad = bad if bad is not None else BadRecords()
    docs = []
    for where, record in iter_records(path, bad):
        try:
            docs.append(record_tokens(record, where, tokenizer, roles))
        except RecordError as e:
            bad.add(e)
    if not docs:
        raise _no_records(path, bad, "{\"text\": \"...\"}")
    return docs


def read_sft_docs(path: str | os.PathLike, tokenizer: Tokenizer, roles: RoleMarkers | None = None,
                  bad: BadRecords | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) of each record of a jsonl/Parquet file (any kind; "text" records by role markers)."""
    bad = bad if bad is not None else BadRecords()
    docs = []
    for where, record in iter_records(path, bad):
        try:
            docs.append(tokenize_segments(chat_segments(record, where, roles), tokenizer, where))
        except RecordError as e:
            bad.add(e)
    if not docs:
        raise _no_records(path, bad, SFT_KEYS)
    return docs
