"""The model's sizes, read from tensor shapes, and the strict check that a checkpoint is a plain RWKV6 x060 one
before it is renamed into another engine's layout."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from src.checkpoint import describe_state_dict, key_mismatch
from src.errors import CheckpointError
from src.rwkv6 import RWKV6, RWKV6Config, base_state_dict

HEAD_SIZE_DIVISOR = 8  # official x060: GroupNorm eps = 1e-5 * 8**2
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelSizes:
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_att: int
    dim_ffn: int
    head_size: int
    d_mix: int  # time_maa_w1 is (C, 5 * d_mix): 32 up to 3B, 64 for 7B/14B
    d_decay: int  # time_decay_w1 is (C, d_decay): 64 up to 3B, 128 for 7B/14B
    time_state: bool


def model_sizes(shapes: Mapping[str, Sequence[int]]) -> ModelSizes:
    """Every size from tensor shapes; CheckpointError unless the tensors are exactly an x060 model's (an
    initial state `blocks.N.att.time_state` allowed)."""
    sd = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    cfg = RWKV6Config.from_state_dict(sd)
    with torch.device("meta"):
        model = RWKV6(cfg)
        if cfg.time_state:
            model.enable_time_state()
    expected = {k: tuple(v.shape) for k, v in base_state_dict(model).items()}
    report = key_mismatch(expected, {k: tuple(s) for k, s in shapes.items()}, limit=8)
    if report:
        raise CheckpointError("the model is not a plain RWKV6 x060 checkpoint: " + "; ".join(report)
                              + f" ({describe_state_dict(list(shapes))}).")
    return ModelSizes(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, dim_att=int(cfg.dim_att),
                      dim_ffn=int(cfg.dim_ffn), head_size=cfg.head_size, d_mix=cfg.d_mix, d_decay=cfg.d_decay,
                      time_state=cfg.time_state)
