"""Unit tests of src/trainer.py pieces the end-to-end runs cannot isolate: the loss-token count survives the
precision plugins, the weight-decay rule, the loss scales and folder replacement."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.precision import DeepSpeedPrecision

from src.config import TrainConfig
from src.data.dataset import KeyedDataset, SampleKey
from src.data.loader import StepWindowDataset
from src.training.module import RWKVLightningModule
from src.training.optimizer import is_weight_decayed
from src.training.states import replace_folder, supersede_newer_states
from tests.tiny import tiny_config


class _Docs(KeyedDataset):
    """n samples of length T whose masks hold `tokens` ones each."""

    def __init__(self, n: int, T: int, tokens: int):
        super().__init__(T, n)
        self.tokens = tokens

    def _sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(self.ctx_len)
        mask[: self.tokens] = 1.0
        zeros = torch.zeros(self.ctx_len, dtype=torch.long)
        return {"input": zeros, "target": zeros, "mask": mask}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_window_token_count_survives_precision_casts(precision: str) -> None:
    """DeepSpeedPrecision casts every floating tensor of a batch: a float count of 65,600 tokens becomes inf in
    fp16 (the loss then trains nothing) and 65,536 in bf16. The count is an integer and stays exact."""
    data = StepWindowDataset(_Docs(n=4, T=16_400, tokens=16_400), window=4)
    sample = data[SampleKey(0, 1)]
    assert sample["window_tokens"].dtype == torch.int64 and int(sample["window_tokens"]) == 65_600
    cast = DeepSpeedPrecision(precision).convert_input({k: v[None] for k, v in sample.items()})  # type: ignore[arg-type]
    assert cast["window_tokens"].dtype == torch.int64 and int(cast["window_tokens"][0]) == 65_600
    assert float(torch.tensor(65_600.0).to(DeepSpeedPrecision(precision)._desired_dtype)) != 65_600  # the bug it avoids


def test_weight_decay_follows_the_official_rule() -> None:
    from src.adapters.config import AdapterConfig
    from src.adapters.inject import inject_adapters
    from src.model import RWKV6

    model = RWKV6(tiny_config(n_layer=1, n_embd=64, d_mix=8, d_decay=16))
    inject_adapters(model, AdapterConfig(method="bone", b=16, grouping="row"))
    decayed = {n for n, p in model.named_parameters() if is_weight_decayed(n, p)}
    assert "blocks.0.att.key.bone" in decayed and "blocks.0.att.key.weight" in decayed
    assert "emb.weight" in decayed and "head.weight" in decayed
    for name in ("att.time_maa_x", "att.time_maa_k", "att.time_decay", "att.time_faaaa", "att.time_maa_w1",
                 "att.time_maa_w2", "att.time_decay_w1", "att.time_decay_w2", "ffn.time_maa_k", "ffn.time_maa_r",
                 "ln1.weight", "att.ln_x.bias"):
        assert f"blocks.0.{name}" not in decayed, name
    names = dict(model.named_parameters())
    assert names["blocks.0.att.time_maa_k"].ndim == 3  # (1, 1, C): ndim >= 2, yet never decayed


@pytest.mark.parametrize("strategy, world, accumulate, expected", [
    ("auto", 1, 1, (1.0, 1.0)), ("ddp", 4, 2, (8.0, 1.0)), ("deepspeed_stage_2", 4, 4, (16.0, 4.0))])
def test_loss_scales_undo_the_frameworks_averaging(strategy: str, world: int, accumulate: int,
                                                   expected: tuple[float, float]) -> None:
    lm = RWKVLightningModule.__new__(RWKVLightningModule)
    torch.nn.Module.__init__(lm)
    lm.cfg = TrainConfig(strategy=strategy)
    fake = SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RWKVLightningModule, "trainer", property(lambda self: fake))
        assert lm._loss_scales() == expected


def test_replace_folder_replaces_a_non_empty_folder(tmp_path: Path) -> None:
    src, dest = tmp_path / ".state.tmp", tmp_path / "state"
    for folder, text in ((src, "new"), (dest, "old")):
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "shard.pt").write_text(text)
    replace_folder(src, dest)
    assert (dest / "checkpoint" / "shard.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_newer_states_are_superseded_when_resuming_an_older_one(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2, 3):
        (folder / f"state-epoch{epoch:06d}.ckpt").write_text(str(epoch))
    moved = supersede_newer_states(tmp_path, folder / "state-epoch000001.ckpt")
    assert [p.name for p in moved] == ["state-epoch000002.ckpt", "state-epoch000003.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["state-epoch000001.ckpt", "superseded"]
    assert supersede_newer_states(tmp_path, folder / "state-epoch000001.ckpt") == []
