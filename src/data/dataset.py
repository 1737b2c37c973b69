"""The datasets the trainer consumes, their validation split and the deterministic distributed sampler.

Every sample is ``{"input": LongTensor (T,), "target": LongTensor (T,), "mask": FloatTensor (T,)}`` with
T = ctx_len, target[t] = input[t + 1] (the token after input[t]), and mask 1.0 where target[t] is trained on,
0.0 on padding and prompt tokens. Padding tokens are 0.

A sample is a pure function of (seed, epoch, global index): there is no hidden RNG state. Datasets are indexed
by ``SampleKey(epoch, index)`` (what ``EpochSampler`` yields, so worker processes need no epoch state) or by a
plain int, which uses the epoch given to ``set_epoch``. ``index == PAD_INDEX`` gives an all-masked padding
sample; the sampler uses it so that every rank gets the same number of samples without repeating a document.

Modes (``data_type``; the file format, jsonl, Parquet or a binidx prefix, is recognised from the file):
    windows   (binidx; jsonl: a .jsonl/.parquet file, every record as unmasked text): random ctx_len+1 token
              windows over all documents joined by token 0; the epoch length is whatever the trainer asks for
              (epoch_steps * micro_bsz * world_size).
    documents (sft): one document per sample, truncated/padded to ctx_len, every document once per epoch in a
              seed+epoch shuffled order, with loss masks: jsonl/Parquet records of any kind (src/data/jsonl.py;
              "text" records by role markers), or the documents of a binidx prefix masked by the role markers
              found in their tokens (src/data/roles.py; documents without an assistant turn are bad records).
    auto: a binidx prefix is ``binidx``; a jsonl/Parquet file is ``sft``, except when its first record is a
              "text" record that is not role-marked chat (chat: it starts with a role marker and has an
              assistant turn), then ``jsonl``.
Bad records stop the build with a message naming file:line (or file row N) and the fix; with
``skip_bad_records`` they are left out, counted by reason and reported (``Datasets.report``).
Validation: an explicit file, or a held-out fraction. Windows: the last documents of the stream (about
val_fraction of its tokens), read as consecutive non-overlapping windows so every validation token is scored
exactly once. Documents: a fixed pseudo-random subset of documents (independent of the training seed, so runs
with different seeds are validated on the same documents).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from src.data.binidx import BinIdxDataset, bin_path, idx_path, prefix_of
from src.data.jsonl import read_sft_docs, read_text_docs, record_kind, text_of
from src.data.roles import DEFAULT_ROLE_MARKERS as DEFAULT_ROLE_MARKERS  # the TrainConfig default
from src.data.roles import RoleMarkers, TokenMarkers, TurnIndex
from src.data.sources import BadRecords, RecordError, iter_records
from src.data.tokenizer import Tokenizer
from src.errors import ConfigError, DataError

PAD_INDEX = -1
SPLIT_SEED = 20240424
DATA_TYPES = ("auto", "binidx", "jsonl", "sft")

Sample = dict[str, torch.Tensor]


class SampleKey(NamedTuple):
    """Which sample to build: ``index`` is the global sample index within ``epoch`` (or PAD_INDEX)."""

    epoch: int
    index: int


class TokenSource(Protocol):
    """A flat token stream: documents back to back."""

    @property
    def total_tokens(self) -> int: ...

    def tokens(self, start: int, length: int) -> np.ndarray: ...


class ArrayTokens:
    """An in-memory flat token stream (tokenized jsonl text)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self._tokens = tokens  # (N,)

    @property
    def total_tokens(self) -> int:
        return len(self._tokens)

    def tokens(self, start: int, length: int) -> np.ndarray:
        return self._tokens[start : start + length]


def make_sample(tokens: np.ndarray, loss_mask: np.ndarray | None, ctx_len: int) -> Sample:
    """Build a sample from up to ctx_len+1 tokens; ``loss_mask[i]`` = 1 to train on predicting token i."""
    n = len(tokens)
    if not 1 <= n <= ctx_len + 1:
        raise ValueError(f"need 1..{ctx_len + 1} tokens for ctx_len {ctx_len}, got {n}")
    window = torch.zeros(ctx_len + 1, dtype=torch.long)  # (T+1,)
    window[:n] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    mask = torch.zeros(ctx_len, dtype=torch.float32)  # (T,)
    if loss_mask is None:
        mask[: n - 1] = 1.0
    else:
        mask[: n - 1] = torch.from_numpy(np.asarray(loss_mask[1:n], dtype=np.float32))
    return {"input": window[:-1].clone(), "target": window[1:].clone(), "mask": mask}


def padding_sample(ctx_len: int) -> Sample:
    """An all-zero sample with mask 0 everywhere: contributes no loss and no tokens."""
    return {
        "input": torch.zeros(ctx_len, dtype=torch.long),
        "target": torch.zeros(ctx_len, dtype=torch.long),
        "mask": torch.zeros(ctx_len, dtype=torch.float32),
    }


class KeyedDataset(Dataset):
    """Base of the datasets: resolves ``int | SampleKey`` to (epoch, index), serves PAD_INDEX, checks ranges."""

    def __init__(self, ctx_len: int, num_samples: int) -> None:
        if ctx_len < 1:
            raise ConfigError(f"ctx_len must be >= 1, got {ctx_len}")
        self.ctx_len = ctx_len
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when the dataset is indexed by a plain int."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int | SampleKey | Sequence[int]) -> Sample:
        if isinstance(key, (int, np.integer)):
            epoch, index = self.epoch, int(key)
        else:
            epoch, index = (int(v) for v in key)
        if index == PAD_INDEX:
            return padding_sample(self.ctx_len)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range [0, {self.num_samples})")
        return self._sample(epoch, index)

    def _sample(self, epoch: int, index: int) -> Sample:
        raise NotImplementedError


class WindowDataset(KeyedDataset):
    """Random ctx_len+1 token windows over tokens [start, stop) of a source; sample = f(seed, epoch, index)."""

    def __init__(
        self, source: TokenSource, start: int, stop: int, ctx_len: int, num_samples: int, seed: int,
        name: str = "training data",
    ) -> None:
        super().__init__(ctx_len, num_samples)
        if stop - start < 2:
            raise DataError(f"{name}: {stop - start} token(s) for training, at least 2 needed; add data")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.start = start
        self.stop = stop
        self.seed = seed

    def window_start(self, epoch: int, index: int) -> int:
        """Flat token position where window (epoch, index) begins."""
        last = max(0, self.stop - self.start - (self.ctx_len + 1))
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.start + int(rng.integers(0, last + 1))

    def _sample(self, epoch: int, index: int) -> Sample:
        begin = self.window_start(epoch, index)
        length = min(self.ctx_len + 1, self.stop - begin)
        return make_sample(self.source.tokens(begin, length), None, self.ctx_len)


class ChunkDataset(KeyedDataset):
    """Consecutive windows over tokens [start, stop), stride ctx_len: every target token exactly once."""

    def __init__(
        self, source: TokenSource, start: int, stop: int, ctx_len: int, name: str = "validation data"
    ) -> None:
        if stop - start < 2:
            raise DataError(
                f"{name}: {stop - start} token(s) for validation, at least 2 needed; add data or raise val_fraction"
            )
        super().__init__(ctx_len, math.ceil((stop - start - 1) / ctx_len))
        self.source = source
        self.start = start
        self.stop = stop

    def _sample(self, epoch: int, index: int) -> Sample:
        begin = self.start + index * self.ctx_len
        length = min(self.ctx_len + 1, self.stop - begin)
        return make_sample(self.source.tokens(begin, length), None, self.ctx_len)


class _Documents(KeyedDataset):
    """One document per sample, truncated to ctx_len+1 tokens and padded; optionally shuffled by (seed, epoch)."""

    def __init__(self, num_docs: int, ctx_len: int, seed: int, shuffle: bool) -> None:
        super().__init__(ctx_len, num_docs)
        if not num_docs:
            raise DataError("no documents in this split; add data or lower val_fraction")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.shuffle = shuffle
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Document index of each sample index in ``epoch`` (a permutation of all documents)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._order is None or self._order_epoch != epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def document(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and loss mask of document ``doc``'s first ctx_len+1 tokens."""
        raise NotImplementedError

    def docs_with_loss(self) -> int:
        """Documents with at least one trained target in their ctx_len window."""
        raise NotImplementedError

    def _sample(self, epoch: int, index: int) -> Sample:
        tokens, mask = self.document(int(self.order(epoch)[index]))
        return make_sample(tokens, mask, self.ctx_len)


class DocumentDataset(_Documents):
    """In-memory documents with their loss masks (jsonl/Parquet SFT records)."""

    def __init__(
        self, docs: Sequence[tuple[np.ndarray, np.ndarray]], ctx_len: int, seed: int, shuffle: bool
    ) -> None:
        super().__init__(len(docs), ctx_len, seed, shuffle)
        lengths = np.array([len(tokens) for tokens, _ in docs], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(lengths)))  # (num_docs + 1,)
        self.tokens = np.concatenate([tokens for tokens, _ in docs]).astype(np.int32)  # (total,)
        self.loss_mask = np.concatenate([mask for _, mask in docs]).astype(np.uint8)  # (total,)
        self.truncated_docs = int((lengths > ctx_len + 1).sum())

    def docs_with_loss(self) -> int:
        starts, ends = self.offsets[:-1], np.minimum(self.offsets[1:], self.offsets[:-1] + self.ctx_len + 1)
        return sum(bool(self.loss_mask[b + 1 : e].any()) for b, e in zip(starts.tolist(), ends.tolist(), strict=True))

    def document(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        begin = int(self.offsets[doc])
        end = min(int(self.offsets[doc + 1]), begin + self.ctx_len + 1)
        return self.tokens[begin:end], self.loss_mask[begin:end]


@dataclass
class BinIdxChat:
    """The documents of a binidx file that have an assistant turn, with the file's turn index."""

    data: BinIdxDataset
    turns: TurnIndex
    doc_ids: np.ndarray  # (num_docs,) idx sequence of each document

    def subset(self, ids: np.ndarray) -> BinIdxChat:
        return BinIdxChat(self.data, self.turns, self.doc_ids[ids])


class BinIdxDocumentDataset(_Documents):
    """Documents of a binidx file, loss-masked by role markers found in their tokens (src/data/roles.py); the
    tokens stay memory-mapped and each mask is built when its sample is."""

    def __init__(self, chat: BinIdxChat, ctx_len: int, seed: int, shuffle: bool) -> None:
        super().__init__(len(chat.doc_ids), ctx_len, seed, shuffle)
        self.chat = chat
        self.truncated_docs = int((chat.data.sizes[chat.doc_ids] > ctx_len + 1).sum())

    def docs_with_loss(self) -> int:
        offsets = self.chat.data.doc_offsets
        return int(self.chat.turns.docs_with_loss(offsets, self.ctx_len)[self.chat.doc_ids].sum())

    def document(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        seq = int(self.chat.doc_ids[doc])
        begin = int(self.chat.data.doc_offsets[seq])
        end = min(int(self.chat.data.doc_offsets[seq + 1]), begin + self.ctx_len + 1)
        return np.asarray(self.chat.data.tokens(begin, end - begin)), self.chat.turns.mask(begin, end)


class EpochSampler(Sampler[SampleKey]):
    """Deterministic distributed sampler over global sample indices 0..num_samples-1.

    Rank r of world_size w takes global indices r, r+w, r+2w, ...; the last round is filled with PAD_INDEX
    keys (all-masked samples) so every rank yields ceil(num_samples / w) keys and no sample repeats.
    ``set_position(epoch, consumed)`` skips the first ``consumed`` global samples of that epoch (for resume).
    ``len()`` stays the full epoch's per-rank count even then: Lightning restores its batch counter on a
    mid-epoch resume and expects the loader to yield only the remaining batches of a full-length epoch.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0
        self.start_round = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; a new epoch starts from its first sample."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start_round = 0

    def set_position(self, epoch: int, consumed: int) -> None:
        """Resume inside ``epoch`` after ``consumed`` global samples (all ranks together) were trained."""
        if consumed % self.world_size != 0 or not 0 <= consumed <= self.per_rank * self.world_size:
            raise ConfigError(
                f"consumed samples {consumed} must be a multiple of world_size {self.world_size} in "
                f"[0, {self.per_rank * self.world_size}]; resume with the same world_size and batch size"
            )
        self.epoch = epoch
        self.start_round = consumed // self.world_size

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[SampleKey]:
        for k in range(self.start_round, self.per_rank):
            index = k * self.world_size + self.rank
            yield SampleKey(self.epoch, index if index < self.num_samples else PAD_INDEX)


def lightning_resume_position(checkpoint: dict, micro_bsz: int, world_size: int) -> tuple[int, int]:
    """(epoch, consumed global samples) to pass to ``EpochSampler.set_position`` from a Lightning checkpoint dict.

    Call it in ``Callback.on_load_checkpoint``, which runs before Lightning builds the data iterator. It counts
    the micro-batches Lightning has processed in the current epoch (``processed`` also covers a checkpoint
    written in ``on_train_batch_end``, whose batch Lightning will not repeat).
    """
    loop = checkpoint["loops"]["fit_loop"]
    epoch = int(loop["epoch_progress"]["current"]["processed"])
    batches = int(loop["epoch_loop.batch_progress"]["current"]["processed"])
    return epoch, batches * micro_bsz * world_size


@dataclass
class Datasets:
    """What ``build_datasets`` returns; ``val`` is None when no validation was asked for. ``report``: one line per
    file with skipped bad records (already logged when ``build_datasets`` was given a log)."""

    train: KeyedDataset
    val: KeyedDataset | None
    data_type: str
    report: list[str] = field(default_factory=list)


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Reader:
    """What every file of one build shares: tokenizer, role markers, bad-record policy; it collects the reports."""

    def __init__(self, tokenizer: Tokenizer | None, roles: RoleMarkers, skip: bool, vocab_size: int,
                 log: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.roles = roles
        self.skip = skip
        self.vocab_size = vocab_size
        self.log = log
        self.report: list[str] = []

    def bad(self) -> BadRecords:
        return BadRecords(self.skip)

    def done(self, path: str | os.PathLike, bad: BadRecords) -> None:
        if bad.skipped:
            line = bad.summary(path)
            self.report.append(line)
            if self.log is not None:
                self.log(line)


def is_binidx(data_file: str | os.PathLike) -> bool:
    """True when ``data_file`` names a binidx pair (prefix, prefix.bin or prefix.idx with both files present)."""
    prefix = prefix_of(data_file)
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def detect_data_type(data_file: str | os.PathLike, role_markers: Sequence[str] | RoleMarkers | None = None,
                     skip_bad_records: bool = False) -> str:
    """'binidx' for a binidx pair; for a jsonl/Parquet file, from its first record: 'jsonl' for a "text" record
    that is not role-marked chat (it must start with a role marker and have an assistant turn), else 'sft'."""
    if is_binidx(data_file):
        return "binidx"
    prefix = prefix_of(data_file)
    path = Path(data_file)
    if not path.is_file():
        raise DataError(
            f"{data_file}: no such file, and no {bin_path(prefix).name}/{idx_path(prefix).name} pair; "
            "pass a .jsonl or .parquet file or a binidx prefix"
        )
    roles = RoleMarkers.parse(role_markers)
    bad = BadRecords(skip_bad_records)
    for where, record in iter_records(path, bad):
        try:
            if record_kind(record, where) != "text":
                return "sft"
            text = text_of(record, where)
        except RecordError as e:
            bad.add(e)
            continue
        return "sft" if roles.starts_with_marker(text) and roles.segments(text)[1] else "jsonl"
    raise DataError(f"{data_file}: no records (the file is empty or blank); add data")


def _load_stream(data_file: str | os.PathLike, data_type: str, reader: _Reader) -> tuple[TokenSource, np.ndarray]:
    """The token stream of a file and its document offsets (num_docs + 1,)."""
    if data_type == "binidx":
        data = BinIdxDataset(data_file, vocab_size=reader.vocab_size)
        return data, data.doc_offsets
    bad = reader.bad()
    docs = read_text_docs(data_file, _require(reader.tokenizer, data_type), reader.roles, bad)
    reader.done(data_file, bad)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs)  # (N,)
    _check_vocab(tokens, reader.vocab_size, data_file)
    return ArrayTokens(tokens), np.concatenate(([0], np.cumsum(lengths)))


def _check_vocab(tokens: np.ndarray, vocab_size: int, data_file: str | os.PathLike) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(
            f"{data_file}: the tokenizer produced id {int(tokens.max())}, outside the model's vocabulary of "
            f"{vocab_size}; use the tokenizer the model was trained with"
        )


def _require(tokenizer: Tokenizer | None, data_type: str) -> Tokenizer:
    if tokenizer is None:
        raise ConfigError(f"data_type '{data_type}' tokenizes text or finds role markers and needs a tokenizer; "
                          "pass WorldTokenizer()")
    return tokenizer


def _stream_split(doc_offsets: np.ndarray, val_fraction: float, data_file: str | os.PathLike) -> int:
    """Token position of the document boundary closest to (1 - val_fraction) of the stream."""
    num_docs = len(doc_offsets) - 1
    if num_docs < 2:
        raise DataError(
            f"{data_file}: {num_docs} document(s) cannot be split into train and validation; "
            "set val_fraction to 0 or give a val_file"
        )
    target = (1.0 - val_fraction) * float(doc_offsets[-1])
    inner = doc_offsets[1:-1]  # (num_docs - 1,) boundaries that leave a document on both sides
    return int(inner[int(np.argmin(np.abs(inner - target)))])


def _doc_split(num_docs: int, val_fraction: float, data_file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) document indices; the val subset depends only on num_docs and val_fraction."""
    num_val = max(1, round(num_docs * val_fraction))
    if num_val >= num_docs:
        raise DataError(
            f"{data_file}: val_fraction {val_fraction} of {num_docs} document(s) leaves none for training; "
            "lower val_fraction or give a val_file"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def build_datasets(
    data_file: str | os.PathLike,
    data_type: str,
    ctx_len: int,
    tokenizer: Tokenizer | None,
    seed: int,
    val_fraction: float = 0.0,
    *,
    val_file: str | os.PathLike | None = None,
    num_samples: int | None = None,
    vocab_size: int = 65536,
    role_markers: Sequence[str] | RoleMarkers | None = None,
    skip_bad_records: bool = False,
    log: Callable[[str], None] | None = _print_stderr,
) -> Datasets:
    """Train and validation datasets for ``data_type`` in {"auto", "binidx", "jsonl", "sft"}.

    ``num_samples`` (window modes only, required there): samples per epoch, epoch_steps * micro_bsz * world_size.
    ``tokenizer`` is needed for jsonl and sft. ``val_file`` and ``val_fraction`` > 0 exclude each other.
    ``role_markers``: --role_markers entries (src/data/roles.py; None = RWKV's). ``skip_bad_records``: leave bad
    records out and count them instead of stopping; each file's count by reason goes to ``log`` (stderr by
    default; None for silence) and to ``Datasets.report``.
    """
    if data_type not in DATA_TYPES:
        raise ConfigError(f"data_type must be one of {DATA_TYPES}, got {data_type!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_file is not None and val_fraction > 0.0:
        raise ConfigError("give either val_file or val_fraction > 0, not both")
    roles = RoleMarkers.parse(role_markers)
    if data_type == "auto":
        data_type = detect_data_type(data_file, roles, skip_bad_records)
    reader = _Reader(tokenizer, roles, skip_bad_records, vocab_size, log)

    if data_type == "sft":
        _require(tokenizer, data_type)
        built = _build_documents(data_file, ctx_len, reader, seed, val_fraction, val_file)
    elif num_samples is None:
        raise ConfigError(
            f"data_type '{data_type}' samples windows and needs num_samples (epoch_steps * micro_bsz * world_size)"
        )
    else:
        built = _build_windows(data_file, data_type, ctx_len, reader, seed, val_fraction, val_file, num_samples)
    built.report = reader.report
    return built


def _sft_source(data_file: str | os.PathLike, reader: _Reader) -> list[tuple[np.ndarray, np.ndarray]] | BinIdxChat:
    """SFT documents of a jsonl/Parquet file (in memory), or the chat documents of a binidx pair."""
    bad = reader.bad()
    if is_binidx(data_file):
        source: list[tuple[np.ndarray, np.ndarray]] | BinIdxChat = _binidx_chat(data_file, reader, bad)
    else:
        source = read_sft_docs(data_file, _require(reader.tokenizer, "sft"), reader.roles, bad)
        _check_vocab(np.concatenate([tokens for tokens, _ in source]), reader.vocab_size, data_file)
    reader.done(data_file, bad)
    return source


def _binidx_chat(data_file: str | os.PathLike, reader: _Reader, bad: BadRecords) -> BinIdxChat:
    """The documents of a binidx pair that have an assistant turn by the role markers in their tokens."""
    data = BinIdxDataset(data_file, vocab_size=reader.vocab_size)
    markers = TokenMarkers(reader.roles, _require(reader.tokenizer, "sft"), reader.vocab_size)
    turns = markers.scan(data.tokens(0, data.total_tokens), data.doc_offsets)
    has = turns.assistant_docs(data.doc_offsets)
    bad.seen = data.num_docs
    missing = np.flatnonzero(~has)
    name = bin_path(data.prefix)
    if missing.size:
        doc = int(missing[0])
        bad.add(RecordError(
            f"{name}: document {doc} (tokens {int(data.doc_offsets[doc])}..{int(data.doc_offsets[doc + 1])}) has no "
            f"assistant turn: none of {reader.roles.describe()} (as tokens: {markers.describe()}) at its start or "
            "after a blank line; write chat documents as 'User: …\\n\\nAssistant: …' text (python -m "
            "scripts.prepare_data), set --role_markers to the role names the data uses, or train every token with "
            "--data_type binidx", "no assistant turn"), count=int(missing.size))
    kept = np.flatnonzero(has)
    if kept.size == 0:
        raise DataError(f"no usable documents: {bad.summary(name)}")
    return BinIdxChat(data, turns, kept)


def _subset(source: list[tuple[np.ndarray, np.ndarray]] | BinIdxChat, ids: np.ndarray) -> (
        list[tuple[np.ndarray, np.ndarray]] | BinIdxChat):
    if isinstance(source, BinIdxChat):
        return source.subset(ids)
    return [source[i] for i in ids]


def _documents(source: list[tuple[np.ndarray, np.ndarray]] | BinIdxChat, ctx_len: int, seed: int,
               shuffle: bool) -> _Documents:
    if isinstance(source, BinIdxChat):
        return BinIdxDocumentDataset(source, ctx_len, seed, shuffle)
    return DocumentDataset(source, ctx_len, seed, shuffle)


def _build_documents(
    data_file: str | os.PathLike,
    ctx_len: int,
    reader: _Reader,
    seed: int,
    val_fraction: float,
    val_file: str | os.PathLike | None,
) -> Datasets:
    docs = _sft_source(data_file, reader)
    val_docs = None
    if val_file is not None:
        val_docs = _sft_source(val_file, reader)
    elif val_fraction > 0.0:
        num_docs = len(docs.doc_ids) if isinstance(docs, BinIdxChat) else len(docs)
        train_ids, val_ids = _doc_split(num_docs, val_fraction, data_file)
        docs, val_docs = _subset(docs, train_ids), _subset(docs, val_ids)
    train = _documents(docs, ctx_len, seed, shuffle=True)
    if train.docs_with_loss() == 0:
        raise DataError(f"{data_file}: no training document has a response token within its first {ctx_len + 1} "
                        f"tokens, so every sample would train on nothing; raise --ctx_len or shorten the prompts")
    val = _documents(val_docs, ctx_len, seed, shuffle=False) if val_docs is not None else None
    return Datasets(train, val, "sft")


def _build_windows(
    data_file: str | os.PathLike,
    data_type: str,
    ctx_len: int,
    reader: _Reader,
    seed: int,
    val_fraction: float,
    val_file: str | os.PathLike | None,
    num_samples: int,
) -> Datasets:
    source, doc_offsets = _load_stream(data_file, data_type, reader)
    stop = source.total_tokens
    val = None
    if val_file is not None:
        val_source, _ = _load_stream(val_file, data_type, reader)
        val = ChunkDataset(val_source, 0, val_source.total_tokens, ctx_len, name=str(val_file))
    elif val_fraction > 0.0:
        stop = _stream_split(doc_offsets, val_fraction, data_file)
        val = ChunkDataset(source, stop, source.total_tokens, ctx_len, name=str(data_file))
    train = WindowDataset(source, 0, stop, ctx_len, num_samples, seed, name=str(data_file))
    return Datasets(train, val, data_type)


def build_eval_dataset(
    data_file: str | os.PathLike, ctx_len: int, tokenizer: Tokenizer | None, vocab_size: int = 65536,
    role_markers: Sequence[str] | RoleMarkers | None = None,
) -> KeyedDataset:
    """Every loss token of a file exactly once, in order: SFT documents one per sample (unshuffled), or
    consecutive ctx_len windows over a text/binidx stream."""
    roles = RoleMarkers.parse(role_markers)
    data_type = detect_data_type(data_file, roles)
    reader = _Reader(tokenizer, roles, False, vocab_size, None)
    if data_type == "sft":
        return _documents(_sft_source(data_file, reader), ctx_len, 0, shuffle=False)
    source, _ = _load_stream(data_file, data_type, reader)
    return ChunkDataset(source, 0, source.total_tokens, ctx_len)
