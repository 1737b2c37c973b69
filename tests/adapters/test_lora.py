"""LoRA and PiSSA layers and math against naive float64 formulas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.adapters.config import AdapterConfig
from src.adapters.lora import LoRALinear, merge_lora, unmerge_lora
from src.errors import AdapterError
from tests.adapters.reference import naive_lora, rel_err


def make_layer(out_f: int, in_f: int, cfg: AdapterConfig, weight: torch.Tensor | None = None,
               seed: int = 0) -> LoRALinear:
    gen = torch.Generator().manual_seed(seed)
    if weight is None:
        weight = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    return LoRALinear(nn.Parameter(weight.clone(), requires_grad=False), cfg)


@pytest.mark.parametrize("out_f, in_f, r, alpha", [(12, 8, 2, 4.0), (8, 24, 4, 4.0), (16, 16, 8, 32.0)])
def test_lora_matches_naive_formula_float64(out_f: int, in_f: int, r: int, alpha: float) -> None:
    layer = make_layer(out_f, in_f, AdapterConfig(method="lora", lora_r=r, lora_alpha=alpha))
    layer.initialize()
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], dy)
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ naive_lora(layer.weight, {"lora_A": a, "lora_B": b}, alpha / r, pissa=False).t()
    ref = torch.autograd.grad(y_ref, [x_ref, a, b], dy)
    assert rel_err(y, y_ref) < 1e-12
    for g, gr in zip(got, ref, strict=True):
        assert rel_err(g, gr) < 1e-12


def test_dropout_applies_in_training_only() -> None:
    layer = make_layer(16, 16, AdapterConfig(method="lora", lora_r=4, lora_dropout=0.5))
    layer.initialize()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16, dtype=torch.float64)
    full = x @ layer.merged_weight().t()
    layer.eval()
    assert rel_err(layer(x), full) < 1e-12
    layer.train()
    assert rel_err(layer(x), full) > 1e-3


def test_pissa_init_keeps_the_function_and_takes_the_principal_part() -> None:
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0], dtype=torch.float64),
                          0.1 * torch.rand(20, generator=gen)])
    weight = u[:, :24] @ torch.diag(spectrum) @ v.t()  # (32, 24) with a clear rank-4 principal part
    cfg = AdapterConfig(method="pissa", lora_r=4, lora_alpha=8)
    layer = make_layer(32, 24, cfg, weight=weight)
    torch.manual_seed(0)
    layer.initialize()
    scale = cfg.lora_scaling
    principal = scale * layer.pissa_B0 @ layer.pissa_A0
    best = u[:, :4] @ torch.diag(spectrum[:4]) @ v[:, :4].t()
    assert rel_err(principal, best) < 1e-6
    assert torch.equal(layer.lora_A, layer.pissa_A0) and torch.equal(layer.lora_B, layer.pissa_B0)
    assert rel_err(layer.weight + principal, weight) < 1e-12  # residual kept in the frozen weight
    x = torch.randn(5, 24, dtype=torch.float64)
    assert rel_err(layer(x), x @ weight.t()) < 1e-12
    # the adapter tensors merge onto the ORIGINAL base
    with torch.no_grad():
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
    tensors = {k: getattr(layer, k).detach() for k in ("lora_A", "lora_B", "pissa_A0", "pissa_B0")}
    merged = merge_lora(weight, tensors, scale, pissa=True)
    assert rel_err(merged, naive_lora(weight, tensors, scale, pissa=True)) < 1e-13
    assert rel_err(x @ merged.t(), layer(x)) < 1e-12
    assert rel_err(unmerge_lora(merged, tensors, scale, pissa=True), weight) < 1e-13


def test_pissa_rank_larger_than_the_matrix_is_refused() -> None:
    layer = make_layer(8, 4, AdapterConfig(method="pissa", lora_r=6))
    with pytest.raises(AdapterError, match="exceeds"):
        layer.initialize()


def test_lora_under_autocast_and_on_bf16_base() -> None:
    layer = make_layer(32, 64, AdapterConfig(method="lora", lora_r=4), weight=torch.randn(32, 64))
    layer.initialize()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 64, requires_grad=True)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16 and rel_err(y16.float(), y32) < 3e-2
    y16.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    bf16 = make_layer(32, 64, AdapterConfig(method="lora", lora_r=4), weight=torch.randn(32, 64).bfloat16())
    assert bf16.lora_A.dtype == torch.float32
    out = bf16(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
