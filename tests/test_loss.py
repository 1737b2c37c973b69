"""L2Wrap (official RWKV logit regulariser, scaled by the upstream gradient) and the masked token loss sum."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.loss import L2Wrap, masked_token_loss_sum


def _logits(dtype: torch.dtype, seed: int = 0, shape: tuple[int, int, int] = (2, 5, 11)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype).requires_grad_(True)


def _ce(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Mean cross-entropy / 2^10, so that its gradient is comparable to L2Wrap's and bf16 rounding of the sum
    does not hide the L2Wrap term (as for one micro-batch's share of a large step)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=gen)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten()) / 1024


def _grad_with_l2(logits: torch.Tensor, upstream: float) -> torch.Tensor:
    logits.grad = None
    (upstream * L2Wrap.apply(_ce(logits), logits)).backward()
    return logits.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [2.0**16, 2.0**-3, 8.0])
def test_gradient_scales_with_upstream_gradient(dtype: torch.dtype, scale: float) -> None:
    """fp16 loss scaling multiplies the upstream gradient by s: the whole logits gradient (CE + L2Wrap) must be
    exactly s times the unscaled one, or the scaler turns the regulariser off relative to the CE."""
    logits = _logits(dtype)
    unscaled = _grad_with_l2(logits, 1.0)
    scaled = _grad_with_l2(logits, scale)
    assert scaled.dtype == dtype
    assert torch.equal(scaled, unscaled * scale)


def test_fp16_loss_scaling_keeps_the_regulariser() -> None:
    """fp16 logits under a 2^16 loss scale: the added gradient, unscaled by the scaler, is the fp64 formula."""
    logits = _logits(torch.float16, seed=2, shape=(2, 4, 7))
    B, T, _ = logits.shape
    scale = 2.0**16
    (scale * L2Wrap.apply(torch.tensor(1.0, requires_grad=True), logits)).backward()
    assert logits.grad.dtype == torch.float16 and torch.isfinite(logits.grad).all()
    ref = logits.detach().double()
    want = torch.zeros_like(ref).scatter_(-1, ref.argmax(-1, keepdim=True), ref.max(-1, keepdim=True).values)
    torch.testing.assert_close(logits.grad.double() / scale, want * (1e-4 / (B * T)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unscaled_gradient_is_the_official_value(dtype: torch.dtype) -> None:
    """At upstream gradient 1: CE gradient plus 1e-4 / (B*T) * max_logit at each position's argmax only."""
    logits = _logits(dtype)
    B, T, V = logits.shape
    (ce_grad,) = torch.autograd.grad(_ce(logits), logits)
    official = torch.zeros_like(logits)
    for b in range(B):
        for t in range(T):
            j = int(logits[b, t].argmax())
            official[b, t, j] = logits[b, t, j] * (1e-4 / (B * T))
    got = _grad_with_l2(logits, 1.0)
    assert torch.equal(got, ce_grad + official)


@pytest.mark.parametrize("scale", [1.0, 3.0, 65536.0])
def test_extra_gradient_equals_autograd_of_half_max_squared(scale: float) -> None:
    """d/dz (z^2 / 2) = z, so L2Wrap's added gradient is the gradient of (1e-4 / (B*T)) * sum(max_logit^2) / 2."""
    logits = _logits(torch.float64, seed=4, shape=(3, 7, 13))
    B, T, _ = logits.shape
    loss = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)  # independent of logits: isolates L2Wrap
    out = scale * L2Wrap.apply(loss, logits)
    assert out.item() == scale * 2.5
    out.backward()
    assert loss.grad.item() == scale
    naive = scale * (1e-4 / (B * T)) * (0.5 * logits.max(-1).values.square()).sum()
    (want,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(logits.grad, want, rtol=1e-13, atol=0)
    assert (logits.grad != 0).sum() == B * T


def test_non_scalar_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="scalar"):
        L2Wrap.apply(torch.ones(2, requires_grad=True), _logits(torch.float32))


def test_masked_token_loss_sum() -> None:
    logits = _logits(torch.float32, shape=(2, 6, 9))
    gen = torch.Generator().manual_seed(7)
    target = torch.randint(0, 9, (2, 6), generator=gen)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    total, count = masked_token_loss_sum(logits, target, mask)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(2, 6)
    torch.testing.assert_close(total, ce[mask.bool()].sum())
    assert count.item() == 5
    total.backward()
    assert not logits.grad[~mask.bool()].any() and logits.grad[mask.bool()].any()

    logits.grad = None
    total, count = masked_token_loss_sum(logits, target, torch.zeros(2, 6))
    assert total.item() == 0.0 and count.item() == 0.0
    total.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()
