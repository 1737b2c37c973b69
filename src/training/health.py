"""Training health: stop (or, within a limit, skip) an optimizer step whose loss or gradient is NaN/Inf.

The check runs after backward and before the optimizer step, so a stopped run has not let the bad step
change any weight, and the training states already on disk stay the last good ones. Under DDP the decision
is reduced over all ranks, so every rank stops or skips together.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from src.errors import ConfigError, RWKVBoneError

log = logging.getLogger(__name__)


class NonFiniteLossError(RWKVBoneError):
    """Training produced a NaN/Inf loss or gradient."""


class NonFiniteGuard(Callback):
    """Check every micro-batch loss and, before each optimizer step, the gradients of the trained tensors.

    `state_folder`: where the training states are, named in the message. `skip_limit`: how many optimizer
    steps with a non-finite loss or gradient may be skipped (their gradients dropped, so the optimizer leaves
    weights and moments untouched) before the run stops; 0 stops at the first. `check_grads`: False when a
    gradient scaler already skips overflowing steps (fp16), so that only the loss is checked.
    """

    def __init__(self, state_folder: str, skip_limit: int = 0, check_grads: bool = True):
        if skip_limit < 0:
            raise ConfigError(f"--skip_nonfinite must be >= 0, got {skip_limit}.")
        self.state_folder = state_folder
        self.skip_limit = skip_limit
        self.check_grads = check_grads
        self.skipped = 0
        self._batch_idx = 0
        self._losses: list[tuple[int, Tensor]] = []  # (micro-batch index in the epoch, loss) since the last step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._losses.append((self._batch_idx, loss.detach()))  # read at the optimizer step: one sync per step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses = self._losses, []
        bad_losses = self._nonfinite_losses(losses)
        bad_grad = self._first_nonfinite_grad(pl_module) if self.check_grads else None
        local = bool(bad_losses) or bad_grad is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        step = trainer.global_step + 1
        what = self._describe(bad_losses, bad_grad)
        where = f"optimizer step {step} (epoch {trainer.current_epoch + 1})"
        if self.skipped < self.skip_limit:
            self.skipped += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            if trainer.is_global_zero:
                log.warning("skipped %s: %s (%d of at most %d skips used).", where, what, self.skipped,
                            self.skip_limit)
            return
        limit = (f" after skipping {self.skipped} step(s), the most --skip_nonfinite {self.skip_limit} allows"
                 if self.skip_limit else "")
        raise NonFiniteLossError(
            f"{what} at {where}; training stopped{limit} before this step changed any weight. The training "
            f"states in {self.state_folder} are from before it and intact. Lower --lr_init (or raise --warmup_steps), "
            f"check the data and the base model for NaN/Inf, then continue with --resume auto; or let "
            f"--skip_nonfinite N skip up to N such steps."
        )

    @staticmethod
    def _nonfinite_losses(losses: list[tuple[int, Tensor]]) -> list[tuple[int, float]]:
        if not losses:
            return []
        values = torch.stack([v.float().reshape(()) for _, v in losses]).cpu().tolist()  # (micro-batches,)
        return [(i, v) for (i, _), v in zip(losses, values, strict=True) if not math.isfinite(v)]

    @staticmethod
    def _first_nonfinite_grad(pl_module: pl.LightningModule) -> str | None:
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return None
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])  # (n_params,) one sync below
        if bool(finite.all()):
            return None
        return named[int((~finite).nonzero()[0])][0]

    @staticmethod
    def _describe(bad_losses: list[tuple[int, float]], bad_grad: str | None) -> str:
        if bad_losses:
            batches = ", ".join(f"{i} (loss {v})" for i, v in bad_losses)
            return f"non-finite loss in micro-batch {batches} of the epoch"
        if bad_grad is not None:
            return f"non-finite gradient (first in {bad_grad}) with a finite loss"
        return "non-finite loss or gradient on another rank"
