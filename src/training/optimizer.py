"""The optimizer's setup: which trainable tensors are weight-decayed, and the learning-rate schedule."""
from __future__ import annotations

import math

from torch import Tensor

from src.config import TrainConfig


def lr_at(step: int, lr_init: float, lr_final: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Learning rate after `step` optimizer steps: linear warmup from 1% of lr_init over `warmup_steps`,
    then decay from lr_init to lr_final over the remaining steps (cosine, linear, exponential or constant)."""
    if step < warmup_steps:
        return lr_init * (0.01 + 0.99 * step / warmup_steps)
    if schedule == "constant":
        return lr_init
    p = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr_init + (lr_final - lr_init) * p
    return lr_init * (lr_final / lr_init) ** p  # exponential


class LRMultiplier:
    """LambdaLR multiplier. Holds plain values only: LambdaLR stores this object's __dict__ in its state
    dict, which must load with weights_only=True."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        self.lr_init, self.lr_final = cfg.lr_init, cfg.lr_final
        self.warmup_steps, self.schedule, self.total_steps = cfg.warmup_steps, cfg.lr_schedule, total_steps

    def __call__(self, step: int) -> float:
        lr = lr_at(step, self.lr_init, self.lr_final, self.warmup_steps, self.schedule, self.total_steps)
        return lr / self.lr_init


def is_weight_decayed(name: str, param: Tensor) -> bool:
    """The official RWKV rule: weight decay applies to tensors whose squeezed shape has at least 2 dims, and never
    to the `time_*` tensors (token-shift mixes, decays, bonus and their low-rank mixers). Adapter matrices (bone,
    LoRA A/B) and full linear weights are decayed; LayerNorm/GroupNorm vectors are not."""
    return param.squeeze().dim() >= 2 and not name.rpartition(".")[2].startswith("time_")
