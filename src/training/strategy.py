"""The Lightning strategy for --strategy (DeepSpeed made safe and accumulating in fp32), the Lightning precision
names, and the fp32 export of the trained tensors under any strategy."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from src.config import TrainConfig
from src.errors import CheckpointError

LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


def make_strategy(cfg: TrainConfig) -> Any:
    """Lightning strategy for --strategy; DeepSpeed variants save only trainable tensors and load safely.

    Under DeepSpeed with bf16/fp16 every parameter (base and adapter) is cast to that dtype and the model runs
    without autocast; the optimizer keeps an fp32 master copy of the trainable tensors, and gradients are
    accumulated across micro-batches in fp32 (`data_types.grad_accum_dtype`)."""
    spec = cfg.strategy_spec
    if not spec.deepspeed:
        return spec.name
    from src.training import deepspeed as ds

    strategy = ds.SafeDeepSpeedStrategy(
        stage=spec.stage, offload_optimizer=spec.offload, offload_parameters=spec.offload and spec.stage == 3,
        exclude_frozen_parameters=True)
    strategy.config["data_types"] = {"grad_accum_dtype": "fp32"}
    return strategy


def trained_tensors(model: nn.Module, strategy: Any) -> dict[str, Tensor]:
    """{name: fp32 CPU copy} of every trainable parameter of `model`. Under DeepSpeed the values come from the
    optimizer's fp32 master copy (the module holds bf16/fp16 copies), gathered one tensor at a time, so ZeRO-3
    never materialises the whole model on a device. A collective under DeepSpeed: call it on every rank."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(strategy, DeepSpeedStrategy):
        return {n: p.detach().float().cpu() for n, p in trainable.items()}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in trainable.items():
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise CheckpointError(f"DeepSpeed holds no fp32 master copy of {name}; cannot export it.")
        out[name] = full.detach().float().cpu()
    return out
