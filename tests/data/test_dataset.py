"""Datasets and sampler: sample layout, determinism, resume, epoch coverage across ranks, validation split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src.data.binidx import BinIdxWriter
from src.data.dataset import (
    PAD_INDEX,
    ArrayTokens,
    ChunkDataset,
    DocumentDataset,
    EpochSampler,
    SampleKey,
    WindowDataset,
    build_datasets,
    detect_data_type,
    lightning_resume_position,
    make_sample,
)
from src.data.tokenizer import WorldTokenizer
from src.errors import ConfigError, DataError


def make_docs(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """n documents, each tagged by its index in its first token (1000 + i), with a random loss mask."""
    docs = []
    for i in range(n):
        length = int(rng.integers(2, 12))
        tokens = np.concatenate(([1000 + i], rng.integers(1, 900, length - 2), [0])).astype(np.int32)
        mask = (rng.random(length) < 0.5).astype(np.uint8)
        docs.append((tokens, mask))
    return docs


def write_binidx(prefix: Path, docs: list[list[int]]) -> None:
    with BinIdxWriter(prefix) as writer:
        for doc in docs:
            writer.add_document(doc)


def test_make_sample_shift_and_padding() -> None:
    sample = make_sample(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 1]), ctx_len=6)
    assert sample["input"].dtype == torch.long and sample["target"].dtype == torch.long
    assert sample["mask"].dtype == torch.float32
    assert sample["input"].tolist() == [5, 6, 7, 8, 0, 0]
    assert sample["target"].tolist() == [6, 7, 8, 0, 0, 0]
    assert sample["mask"].tolist() == [0, 1, 1, 0, 0, 0]
    assert sample["target"][:-1].tolist() == sample["input"][1:].tolist()
    full = make_sample(np.arange(1, 5), None, ctx_len=3)
    assert full["input"].tolist() == [1, 2, 3] and full["target"].tolist() == [2, 3, 4]
    assert full["mask"].tolist() == [1, 1, 1]


def test_window_samples_are_windows_of_the_stream_and_deterministic() -> None:
    stream = np.arange(1, 501, dtype=np.int32)
    a = WindowDataset(ArrayTokens(stream), 0, 500, ctx_len=16, num_samples=64, seed=3)
    b = WindowDataset(ArrayTokens(stream.copy()), 0, 500, ctx_len=16, num_samples=64, seed=3)
    starts = set()
    for i in range(64):
        s = a[SampleKey(2, i)]
        begin = a.window_start(2, i)
        starts.add(begin)
        assert s["input"].tolist() == stream[begin : begin + 16].tolist()
        assert s["target"].tolist() == stream[begin + 1 : begin + 17].tolist()
        assert s["mask"].sum().item() == 16
        assert all(torch.equal(s[k], b[SampleKey(2, i)][k]) for k in s)
    assert len(starts) > 50
    assert [a.window_start(3, i) for i in range(64)] != [a.window_start(2, i) for i in range(64)]
    other_seed = WindowDataset(ArrayTokens(stream), 0, 500, ctx_len=16, num_samples=64, seed=4)
    assert [other_seed.window_start(2, i) for i in range(64)] != [a.window_start(2, i) for i in range(64)]
    a.set_epoch(2)
    assert torch.equal(a[5]["input"], a[SampleKey(2, 5)]["input"])


def test_window_short_stream_is_padded() -> None:
    data = WindowDataset(ArrayTokens(np.array([4, 5, 6])), 0, 3, ctx_len=8, num_samples=2, seed=0)
    sample = data[0]
    assert sample["input"].tolist() == [4, 5, 6, 0, 0, 0, 0, 0]
    assert sample["mask"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_sampler_resume_reproduces_the_remaining_samples() -> None:
    data = WindowDataset(ArrayTokens(np.arange(1, 300)), 0, 299, ctx_len=8, num_samples=24, seed=1)
    full = {}
    for rank in range(2):
        sampler = EpochSampler(len(data), rank=rank, world_size=2)
        sampler.set_epoch(4)
        full[rank] = [data[key]["input"].tolist() for key in sampler]
        resumed = EpochSampler(len(data), rank=rank, world_size=2)
        resumed.set_position(4, consumed=10)
        resumed.set_epoch(4)
        assert len(resumed) == 12
        assert [data[key]["input"].tolist() for key in resumed] == full[rank][5:]
        resumed.set_epoch(5)
        assert len(list(resumed)) == 12 and next(iter(resumed)) == SampleKey(5, rank)
    assert full[0] != full[1]


def test_sampler_rejects_bad_positions() -> None:
    sampler = EpochSampler(10, rank=1, world_size=2)
    with pytest.raises(ConfigError, match="multiple of world_size"):
        sampler.set_position(0, consumed=3)
    with pytest.raises(ConfigError, match="rank"):
        EpochSampler(10, rank=2, world_size=2)


@pytest.mark.parametrize("num_docs", [7, 8])
def test_sft_epoch_covers_every_document_once_across_two_ranks(num_docs: int) -> None:
    docs = make_docs(num_docs, np.random.default_rng(0))
    data = DocumentDataset(docs, ctx_len=16, seed=5, shuffle=True)
    orders = []
    for epoch in range(3):
        seen: list[int] = []
        counts = []
        for rank in range(2):
            sampler = EpochSampler(len(data), rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            keys = list(sampler)
            counts.append(len(keys))
            for key in keys:
                sample = data[key]
                if key.index == PAD_INDEX:
                    assert sample["mask"].sum().item() == 0
                else:
                    seen.append(int(sample["input"][0]) - 1000)
        assert counts[0] == counts[1] == (num_docs + 1) // 2
        assert sorted(seen) == list(range(num_docs))
        orders.append(data.order(epoch).tolist())
    assert orders[0] != orders[1] != orders[2]
    assert DocumentDataset(docs, 16, seed=5, shuffle=True).order(1).tolist() == orders[1]


def test_sft_sample_truncation_padding_and_mask() -> None:
    tokens = np.arange(1, 21, dtype=np.int32)
    mask = np.array([0] * 10 + [1] * 10, dtype=np.uint8)
    short = (np.array([7, 8, 9], dtype=np.int32), np.array([0, 1, 1], dtype=np.uint8))
    data = DocumentDataset([(tokens, mask), short], ctx_len=12, seed=0, shuffle=False)
    assert data.truncated_docs == 1
    long_sample, short_sample = data[0], data[1]
    assert long_sample["input"].tolist() == list(range(1, 13))
    assert long_sample["target"].tolist() == list(range(2, 14))
    assert long_sample["mask"].tolist() == [0] * 9 + [1] * 3
    assert short_sample["input"].tolist() == [7, 8, 9] + [0] * 9
    assert short_sample["target"].tolist() == [8, 9] + [0] * 10
    assert short_sample["mask"].tolist() == [1, 1] + [0] * 10
    with pytest.raises(IndexError):
        data[2]


def test_chunk_dataset_scores_every_target_once() -> None:
    stream = np.arange(1, 40, dtype=np.int32)
    data = ChunkDataset(ArrayTokens(stream), 5, 39, ctx_len=8)
    targets = []
    for i in range(len(data)):
        s = data[i]
        targets += s["target"][s["mask"] == 1].tolist()
    assert targets == stream[6:39].tolist()


def test_dataloader_workers_follow_sampler_epochs() -> None:
    data = WindowDataset(ArrayTokens(np.arange(1, 200)), 0, 199, ctx_len=4, num_samples=8, seed=0)
    sampler = EpochSampler(len(data))
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert batches[0]["input"].shape == (4, 4) and batches[0]["mask"].dtype == torch.float32
        got = torch.cat([b["input"] for b in batches])
        assert torch.equal(got, torch.stack([data[SampleKey(epoch, i)]["input"] for i in range(8)]))


def test_build_sft_with_val_fraction(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    lines = [json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) for i in range(20)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    built = build_datasets(path, "auto", 32, tokenizer, seed=1, val_fraction=0.2)
    assert built.data_type == "sft"
    assert len(built.train) == 16 and len(built.val) == 4

    def questions(data: DocumentDataset) -> set[str]:
        out = set()
        for i in range(len(data)):
            s = data[i]
            out.add(tokenizer.decode(s["input"][s["input"] != 0].tolist()).split("\n\n")[0])
        return out

    train_q, val_q = questions(built.train), questions(built.val)
    assert not train_q & val_q and len(train_q | val_q) == 20
    again = build_datasets(path, "sft", 32, tokenizer, seed=2, val_fraction=0.2)
    assert questions(again.val) == val_q


def test_build_binidx_with_val_fraction(tmp_path: Path) -> None:
    docs = [[i + 1] * 9 + [0] for i in range(10)]
    write_binidx(tmp_path / "d", docs)
    built = build_datasets(tmp_path / "d.bin", "auto", 8, None, seed=0, val_fraction=0.2, num_samples=40)
    assert built.data_type == "binidx"
    train, val = built.train, built.val
    assert train.stop == val.start == 80
    assert all(train.window_start(0, i) + 9 <= 80 for i in range(40))
    val_targets = torch.cat([val[i]["target"][val[i]["mask"] == 1] for i in range(len(val))])
    assert val_targets.tolist() == sum(docs[8:], [])[1:]


def test_build_jsonl_windows_join_documents_with_eos(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha beta", "gamma"]), encoding="utf-8")
    built = build_datasets(path, "auto", 64, tokenizer, seed=0, num_samples=4)
    assert built.data_type == "jsonl" and built.val is None and len(built.train) == 4
    expected = tokenizer.encode("alpha beta") + [0] + tokenizer.encode("gamma") + [0]
    sample = built.train[0]
    assert sample["input"][: len(expected) - 1].tolist() == expected[:-1]
    assert sample["mask"].sum().item() == len(expected) - 1


def test_build_with_val_file(tmp_path: Path) -> None:
    write_binidx(tmp_path / "train", [[1, 2, 3, 0]] * 5)
    write_binidx(tmp_path / "val", [[7, 8, 9, 0]])
    built = build_datasets(tmp_path / "train", "binidx", 4, None, 0, val_file=tmp_path / "val", num_samples=8)
    assert built.val[0]["target"][:3].tolist() == [8, 9, 0]


def test_detect_data_type(tmp_path: Path) -> None:
    write_binidx(tmp_path / "d", [[1, 0]])
    assert detect_data_type(tmp_path / "d") == detect_data_type(tmp_path / "d.idx") == "binidx"
    (tmp_path / "m.jsonl").write_text('\n{"messages": []}\n', encoding="utf-8")
    assert detect_data_type(tmp_path / "m.jsonl") == "sft"


def test_build_errors(tmp_path: Path, tokenizer: WorldTokenizer) -> None:
    with pytest.raises(DataError, match="no such file"):
        build_datasets(tmp_path / "missing", "auto", 8, tokenizer, 0, num_samples=4)
    with pytest.raises(DataError, match=r"missing\.idx: file not found"):
        build_datasets(tmp_path / "missing", "binidx", 8, tokenizer, 0, num_samples=4)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        build_datasets(tmp_path / "empty.jsonl", "sft", 8, tokenizer, 0)
    with pytest.raises(DataError, match="no records"):
        build_datasets(tmp_path / "empty.jsonl", "jsonl", 8, tokenizer, 0, num_samples=4)
    (tmp_path / "tiny.jsonl").write_text('{"text": ""}', encoding="utf-8")
    with pytest.raises(DataError, match=r"tiny\.jsonl: 1 token\(s\) for training, at least 2 needed"):
        build_datasets(tmp_path / "tiny.jsonl", "jsonl", 8, tokenizer, 0, num_samples=4)
    write_binidx(tmp_path / "one", [[1, 2, 0]])
    with pytest.raises(DataError, match="cannot be split"):
        build_datasets(tmp_path / "one", "binidx", 8, None, 0, val_fraction=0.1, num_samples=4)
    with pytest.raises(ConfigError, match="num_samples"):
        build_datasets(tmp_path / "one", "binidx", 8, None, 0)
    with pytest.raises(ConfigError, match="not both"):
        build_datasets(tmp_path / "one", "binidx", 8, None, 0, 0.1, val_file=tmp_path / "one", num_samples=4)
    with pytest.raises(ConfigError, match="data_type"):
        build_datasets(tmp_path / "one", "text", 8, None, 0, num_samples=4)
    (tmp_path / "t.jsonl").write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_datasets(tmp_path / "t.jsonl", "jsonl", 8, None, 0, num_samples=4)
    with pytest.raises(DataError, match=r"t\.jsonl: the tokenizer produced id \d+, outside the model's vocabulary"):
        build_datasets(tmp_path / "t.jsonl", "jsonl", 8, tokenizer, 0, num_samples=4, vocab_size=10)
    (tmp_path / "s.jsonl").write_text('{"prompt": "x", "response": "y"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.jsonl: the tokenizer produced id"):
        build_datasets(tmp_path / "s.jsonl", "sft", 8, tokenizer, 0, vocab_size=10)
    write_binidx(tmp_path / "big", [[1, 50, 0]])
    with pytest.raises(DataError, match="token id 50 at token position 1"):
        build_datasets(tmp_path / "big", "binidx", 8, None, 0, num_samples=4, vocab_size=10)


def test_lightning_mid_epoch_resume_continues_with_the_same_samples(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class Stop(Exception):
        pass

    class Recorder(pl.LightningModule):
        def __init__(self, seen: list, stop_at: int | None) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen, self.stop_at = seen, stop_at

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.seen.append((self.current_epoch, batch["input"][:, 0].tolist()))
            return (self.weight * batch["mask"].sum()).sum()

        def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
            if self.global_step == self.stop_at:
                self.trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise Stop

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Resume(pl.Callback):
        def __init__(self, sampler: EpochSampler) -> None:
            self.sampler = sampler

        def on_load_checkpoint(self, trainer: object, pl_module: object, checkpoint: dict) -> None:
            self.sampler.set_position(*lightning_resume_position(checkpoint, micro_bsz=2, world_size=1))

    def run(stop_at: int | None, ckpt: Path | None) -> list:
        data = WindowDataset(ArrayTokens(np.arange(1, 2000)), 0, 1999, ctx_len=4, num_samples=12, seed=0)
        sampler = EpochSampler(len(data))
        seen: list = []
        trainer = pl.Trainer(
            max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, use_distributed_sampler=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Resume(sampler)],
        )
        try:
            trainer.fit(Recorder(seen, stop_at), DataLoader(data, batch_size=2, sampler=sampler), ckpt_path=ckpt)
        except Stop:
            pass
        return seen

    full = run(None, None)
    first = run(9, None)
    rest = run(None, tmp_path / "mid.ckpt")
    assert len(full) == 18 and len(first) == 9
    assert first + rest == full
