"""Tiny RWKV6 checkpoints with random weights and official key names, for tests (built by
src/diagnostics/random_model.py, the project's one random-checkpoint builder)."""
from __future__ import annotations

import torch

from src.diagnostics.random_model import random_state_dict
from src.model import RWKV6Config


def tiny_config(n_layer: int = 2, n_embd: int = 128, vocab_size: int = 256, d_mix: int = 32, d_decay: int = 64,
                **kw: object) -> RWKV6Config:
    return RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, d_mix=d_mix, d_decay=d_decay,
                       wkv_backend="torch", **kw)  # type: ignore[arg-type]


def tiny_state_dict(cfg: RWKV6Config | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                    noise: float = 0.1) -> dict[str, torch.Tensor]:
    """An official-key x060 state dict: the project's init plus random noise on every tensor, so that no
    tensor is zero or constant (zero output projections would hide bugs)."""
    return random_state_dict(cfg or tiny_config(), seed=seed, dtype=dtype, kind="noisy_init", noise=noise)
