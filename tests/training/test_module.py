"""src/training/module.py: the loss scales that turn micro-batch sums into the step's token mean."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.config import TrainConfig
from src.training.module import RWKVLightningModule


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
