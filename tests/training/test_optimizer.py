"""src/training/optimizer.py: the weight-decay rule and the LR schedule."""
from __future__ import annotations

import pytest

from src.training.optimizer import is_weight_decayed, lr_at
from tests.tiny import tiny_config


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


def test_lr_schedule_values() -> None:
    kw = dict(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, total_steps=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1e-5)
    assert lr_at(5, schedule="cosine", **kw) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1e-3)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(5.5e-4)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(1e-4)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(5.5e-4)
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert lr_at(60, schedule="exponential", **kw) == pytest.approx((1e-3 * 1e-4) ** 0.5)
    assert lr_at(200, schedule="exponential", **kw) == pytest.approx(1e-4)
    assert lr_at(60, schedule="constant", **kw) == pytest.approx(1e-3)
