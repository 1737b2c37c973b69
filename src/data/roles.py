"""Loss masking by role markers: the RWKV community's SFT text format, in text and in binidx token streams.

A document such as ``"System: Be brief.\\n\\nUser: Hi\\n\\nAssistant: Hello!\\n\\nUser: 2+2?\\n\\nAssistant: 4"``
trains only on the assistant's words. The exact rule:

* A *marker* is a configured role name followed by ``:`` (``Assistant:``), at the very start of the document or
  directly after a blank line ``\\n\\n`` (after ``\\n\\n\\n`` too: the last two newlines count). Names match
  exactly and case-sensitively: ``Username:``, ``user:``, ``Assistant :`` and an ``Assistant:`` in the middle
  of a line are not markers.
* A *turn* runs from its marker up to the next marker, or to the end of the document. So the ``\\n\\n`` before
  the next marker ends (and belongs to) the turn before it, and a ``\\n\\n`` that is not followed by a marker, a
  paragraph break inside an answer, stays inside its turn.
* The loss covers, in every turn of an assistant role, everything after its marker (normally `` answer`` with
  its leading space: at inference the prompt ends with ``Assistant:``) up to and including the turn's end, the
  ``\\n\\n`` separator or, for the last turn, the end-of-document token 0. Markers, turns of user roles and any
  text before the first marker are not trained.
* A document without any assistant marker has nothing to train on (a bad record for SFT).

Role names (``role_markers``, the --role_markers flag): entries ``user=Name,Name,...`` and
``assistant=Name,...``; ``DEFAULT_ROLE_MARKERS`` are RWKV's: user roles User, System, Instruction, Input and
assistant roles Assistant, Response. A group left out keeps its default. User roles matter as well: their
markers end the assistant turn before them.

In text ("text" records of jsonl/Parquet files) the rule cuts the string into prompt and loss pieces, each
tokenized on its own so the mask boundary falls exactly between tokens (``RoleMarkers.segments``). In a binidx
document the same rule runs on tokens (``TokenMarkers.scan`` -> ``TurnIndex``): a marker is the token sequence
of ``"Name:"`` (``encode("Assistant:")``) at the start of an idx sequence, after a token 0 inside one (the start
of the next document), or after tokens whose bytes end in ``\\n\\n``; its final ``:`` token may also be any
token that starts with ``:`` (text tokenized whole turns ``User:**`` into ``User``, ``:**``), and such a token
counts as part of the marker. ``\\n\\n`` is a token of its own in the World vocabulary and ``Name:`` tokenizes
alike after it, so text and tokens give the same mask: scripts/prepare_data writes chat text in the very pieces
the SFT reader tokenizes (a prompt piece always ends with the assistant marker's ``:``), and the tests check
that the two agree token for token.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from src.data.tokenizer import Tokenizer
from src.errors import ConfigError

DEFAULT_ROLE_MARKERS = ("user=User,System,Instruction,Input", "assistant=Assistant,Response")
ROLE_GROUPS = ("user", "assistant")
SCAN_CHUNK_TOKENS = 1 << 24

Segment = tuple[str, bool]  # (text, is_loss)


def append_segment(segments: list[Segment], text: str, is_loss: bool) -> None:
    """Append a piece, joined to the last one when the masks are equal (so it is tokenized with it)."""
    if segments and segments[-1][1] == is_loss:
        segments[-1] = (segments[-1][0] + text, is_loss)
    else:
        segments.append((text, is_loss))


def _parse_group(item: str) -> tuple[str, tuple[str, ...]]:
    key, sep, names = item.partition("=")
    key = key.strip().lower()
    if not sep or key not in ROLE_GROUPS:
        raise ConfigError(f"--role_markers entry {item!r}: expected user=Name,Name,... or assistant=Name,... "
                          f"(default: {' '.join(DEFAULT_ROLE_MARKERS)})")
    parsed = tuple(name.strip() for name in names.split(","))
    for name in parsed:
        if not name or any(c in name for c in ":\n\r"):
            raise ConfigError(f"--role_markers entry {item!r}: role name {name!r} must be non-empty, without ':' "
                              "or line breaks (the marker is the name followed by ':')")
    return key, parsed


@dataclass(frozen=True)
class RoleMarkers:
    """Role names whose markers start turns: ``user`` turns are not trained, ``assistant`` turns are."""

    user: tuple[str, ...] = ("User", "System", "Instruction", "Input")
    assistant: tuple[str, ...] = ("Assistant", "Response")

    def __post_init__(self) -> None:
        if not self.user or not self.assistant:
            raise ConfigError("--role_markers needs at least one user role and one assistant role")
        both = sorted(set(self.user) & set(self.assistant))
        if both:
            raise ConfigError(f"--role_markers: {both} is both a user and an assistant role; give each name once")

    @classmethod
    def parse(cls, spec: Sequence[str] | str | None = None) -> RoleMarkers:
        """From entries like ``["user=User,System", "assistant=Assistant"]`` (a string is split on spaces);
        None or an empty list gives RWKV's defaults, and a group left out keeps its default."""
        if spec is None:
            return cls()
        if isinstance(spec, RoleMarkers):
            return spec
        items = spec.split() if isinstance(spec, str) else list(spec)
        groups: dict[str, tuple[str, ...]] = {}
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(f"--role_markers entries must be strings like 'assistant=Assistant', got {item!r}")
            key, names = _parse_group(item)
            if key in groups:
                raise ConfigError(f"--role_markers gives {key}= twice; list all its names in one entry, "
                                  "separated by commas")
            groups[key] = names
        return cls(**groups)

    def spec(self) -> list[str]:
        """The --role_markers entries that give these markers."""
        return [f"user={','.join(self.user)}", f"assistant={','.join(self.assistant)}"]

    def describe(self) -> str:
        """The assistant markers, for messages: ``'Assistant:' or 'Response:'``."""
        return " or ".join(f"'{name}:'" for name in self.assistant)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        names = sorted({*self.user, *self.assistant}, key=len, reverse=True)
        return re.compile(r"(?:^|(?<=\n\n))(" + "|".join(re.escape(n) for n in names) + r"):")

    def starts_with_marker(self, text: str) -> bool:
        """True when ``text`` begins with a role marker."""
        return self._pattern.match(text) is not None

    def segments(self, text: str) -> tuple[list[Segment], bool]:
        """(prompt/loss pieces of ``text`` by the module's rule, whether it has an assistant turn).

        The pieces join to ``text``; equal masks next to each other are one piece. The mask of the document's end
        token is the mask of the last piece (1 when the last turn is an assistant turn)."""
        segments: list[Segment] = []
        matches = list(self._pattern.finditer(text))
        first = matches[0].start() if matches else len(text)
        if first:
            append_segment(segments, text[:first], False)
        has_assistant = False
        assistant = set(self.assistant)
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            is_loss = match.group(1) in assistant
            has_assistant |= is_loss
            append_segment(segments, match.group(0), False)
            append_segment(segments, text[match.end() : end], is_loss)
        if not segments:
            segments.append(("", False))
        return segments, has_assistant


@dataclass
class TurnIndex:
    """Turn boundaries of a token stream, sorted by position: where a turn (or a document) starts, where its
    trained part would start (after the marker) and whether it is trained. A boundary's turn ends at the next
    boundary. Every document start is a boundary (untrained), so a document's mask needs only its own range."""

    positions: np.ndarray  # (K,) int64
    content: np.ndarray  # (K,) int64
    loss: np.ndarray  # (K,) bool

    def mask(self, begin: int, end: int) -> np.ndarray:
        """Loss mask (uint8, 1 = train on this token) of tokens [begin, end); ``begin`` must be a document start."""
        mask = np.zeros(end - begin, dtype=np.uint8)
        first = int(np.searchsorted(self.positions, begin, side="left"))
        last = int(np.searchsorted(self.positions, end, side="left"))
        for j in range(first, last):
            if self.loss[j]:
                stop = int(self.positions[j + 1]) if j + 1 < len(self.positions) else end
                mask[int(self.content[j]) - begin : min(stop, end) - begin] = 1
        return mask

    def assistant_docs(self, doc_offsets: np.ndarray) -> np.ndarray:
        """(num_docs,) bool: documents (idx sequences) with at least one assistant marker."""
        has = np.zeros(len(doc_offsets) - 1, dtype=bool)
        docs = np.searchsorted(doc_offsets, self.positions[self.loss], side="right") - 1
        has[docs] = True
        return has

    def docs_with_loss(self, doc_offsets: np.ndarray, ctx_len: int) -> np.ndarray:
        """(num_docs,) bool: documents whose first ctx_len+1 tokens have a trained target (a token after the
        first one with mask 1), i.e. whose truncated sample trains on something."""
        has = np.zeros(len(doc_offsets) - 1, dtype=bool)
        trained = np.flatnonzero(self.loss)
        if trained.size == 0:
            return has
        nxt = np.append(self.positions, np.iinfo(np.int64).max)[trained + 1]
        docs = np.searchsorted(doc_offsets, self.positions[trained], side="right") - 1
        begin, end = doc_offsets[docs], np.minimum(doc_offsets[docs + 1], doc_offsets[docs] + ctx_len + 1)
        lo, hi = np.maximum(self.content[trained], begin + 1), np.minimum(nxt, end)
        has[docs[lo < hi]] = True
        return has


class TokenMarkers:
    """The role markers as token sequences (``encode("Name:")``) and byte facts of the vocabulary, to find
    turns in a token stream by the module's rule."""

    def __init__(self, roles: RoleMarkers, tokenizer: Tokenizer, vocab_size: int = 65536) -> None:
        self.roles = roles
        size = max(vocab_size, 65536)
        self.ends_blank = np.zeros(size, dtype=bool)  # token bytes end with "\n\n"
        self.is_newline = np.zeros(size, dtype=bool)  # token bytes are "\n"
        self.ends_newline = np.zeros(size, dtype=bool)  # token bytes end with "\n"
        self.starts_colon = np.zeros(size, dtype=bool)  # token bytes start with ":" (":", ":**", "::", ...)
        vocabulary = _vocabulary_bytes(tokenizer, size)
        for token_id, data in enumerate(vocabulary):
            self.ends_blank[token_id] = data.endswith(b"\n\n")
            self.is_newline[token_id] = data == b"\n"
            self.ends_newline[token_id] = data.endswith(b"\n")
            self.starts_colon[token_id] = data.startswith(b":")
        # (tokens of "Name:", whether its last token is ":" alone, trained): such a ':' may merge with what follows
        # it in text tokenized whole ("User:**" is User, ":**"), so any token starting with ':' ends that marker.
        self.sequences: list[tuple[np.ndarray, bool, bool]] = []
        for names, is_loss in ((roles.user, False), (roles.assistant, True)):
            for name in names:
                seq = np.asarray(tokenizer.encode(f"{name}:"), dtype=np.int64)
                loose = len(seq) > 1 and int(seq[-1]) < len(vocabulary) and vocabulary[int(seq[-1])] == b":"
                self.sequences.append((seq, loose, is_loss))

    def describe(self) -> str:
        """The assistant markers' token sequences, for messages: ``'Assistant:' = [5585, 41693, 59], ...``."""
        names = (*self.roles.user, *self.roles.assistant)
        return ", ".join(f"'{name}:' = {seq.tolist()}" for name, (seq, _, is_loss) in
                         zip(names, self.sequences, strict=True) if is_loss)

    def scan(self, flat: np.ndarray, doc_offsets: np.ndarray) -> TurnIndex:
        """Turns of all documents of a flat stream (documents [doc_offsets[i], doc_offsets[i+1])), read in
        chunks so a memory-mapped stream is not loaded at once."""
        total = int(doc_offsets[-1])
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        hit_pos, hit_len, hit_loss, zeros = [], [], [], []
        longest = max(len(seq) for seq, _, _ in self.sequences)
        for start in range(0, total, SCAN_CHUNK_TOKENS):
            stop = min(total, start + SCAN_CHUNK_TOKENS)
            window = np.asarray(flat[start : min(total, stop + longest - 1)])
            head = window[: stop - start]
            zeros.append(np.flatnonzero(head == 0) + start)
            for seq, loose, is_loss in self.sequences:
                found = np.flatnonzero(head == seq[0])
                for t in range(1, len(seq)):
                    found = found[found + t < len(window)]
                    following = window[found + t]
                    if loose and t == len(seq) - 1:
                        found = found[self.starts_colon[np.clip(following, 0, len(self.starts_colon) - 1)]]
                    else:
                        found = found[following == seq[t]]
                hit_pos.append(found + start)
                hit_len.append(np.full(found.size, len(seq), dtype=np.int64))
                hit_loss.append(np.full(found.size, is_loss))
        pos = np.concatenate(hit_pos).astype(np.int64)
        length = np.concatenate(hit_len)
        loss = np.concatenate(hit_loss).astype(bool)
        if pos.size:
            doc = np.searchsorted(doc_offsets, pos, side="right") - 1
            begin, end = doc_offsets[doc], doc_offsets[doc + 1]
            prev1 = np.asarray(flat[np.maximum(pos - 1, 0)]).astype(np.int64)
            prev2 = np.asarray(flat[np.maximum(pos - 2, 0)]).astype(np.int64)
            prev1c, prev2c = np.clip(prev1, 0, len(self.ends_blank) - 1), np.clip(prev2, 0, len(self.ends_blank) - 1)
            after_blank = self.ends_blank[prev1c] | (self.is_newline[prev1c] & (pos - 2 >= begin)
                                                    & self.ends_newline[prev2c])
            keep = (pos + length <= end) & ((pos == begin) | (prev1 == 0) | after_blank)
            pos, length, loss = pos[keep], length[keep], loss[keep]
            order = np.lexsort((-length, pos))  # at one position the longest marker wins
            pos, length, loss = pos[order], length[order], loss[order]
            first = np.concatenate(([True], pos[1:] != pos[:-1]))
            pos, length, loss = pos[first], length[first], loss[first]
        zero = np.concatenate(zeros).astype(np.int64)
        zero_doc = np.searchsorted(doc_offsets, zero, side="right") - 1
        inner_starts = zero[zero + 1 < doc_offsets[zero_doc + 1]] + 1  # a token 0 inside a sequence ends a document
        starts = np.concatenate((doc_offsets[:-1], inner_starts))
        positions = np.concatenate((starts, pos))
        content = np.concatenate((starts, pos + length))
        is_loss = np.concatenate((np.zeros(starts.size, dtype=bool), loss))
        kind = np.concatenate((np.zeros(starts.size, dtype=np.int8), np.ones(pos.size, dtype=np.int8)))
        order = np.lexsort((kind, positions))  # a document start before a marker at the same position
        return TurnIndex(positions[order], content[order], is_loss[order])


def _vocabulary_bytes(tokenizer: Tokenizer, size: int) -> list[bytes]:
    """The bytes of token ids 0.. (up to ``size``): the tokenizer's table, or decoded one by one."""
    table = getattr(tokenizer, "token_bytes", None)
    if table is not None:
        return list(table())[:size]
    out = []
    for token_id in range(size):
        try:
            out.append(tokenizer.decode([token_id]).encode("utf-8"))
        except Exception:  # past the end of the vocabulary
            break
    return out
