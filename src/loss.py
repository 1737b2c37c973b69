"""Training loss: masked token cross-entropy summed per batch (the trainer divides by the loss-token count
of the whole optimizer step), and L2Wrap, the official RWKV logit regulariser."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class L2Wrap(torch.autograd.Function):
    """Identity on a scalar loss; in backward adds `factor * max_logit * grad_output` to the gradient of each
    position's largest logit (factor = 1e-4 / (B*T)), discouraging logits from drifting up. `positions` replaces
    B*T when the logits are one chunk of a longer sequence (the factor is per position of the whole sequence).

    At an upstream gradient of 1 this is the official RWKV trainer's value. Unlike the official version it
    scales with the upstream gradient, so fp16 loss scaling (and any factor applied to the returned loss)
    scales it exactly like the cross-entropy gradient."""

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, positions: int | None = None) -> Tensor:  # type: ignore[override]
        if loss.numel() != 1:
            raise ValueError(f"L2Wrap expects a scalar loss, got shape {tuple(loss.shape)}.")
        ctx.save_for_backward(logits)
        ctx.positions = positions if positions is not None else logits.shape[0] * logits.shape[1]
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / ctx.positions
        compute = torch.promote_types(logits.dtype, torch.float32)
        scale = grad_output.reshape(()).to(compute) * factor  # 0-dim: broadcasts over every position
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, (maxx.to(compute) * scale).to(logits.dtype))
        return grad_output, glogits, None


def masked_token_loss_sum(logits: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropy over positions where mask=1, number of such positions).

    logits (B, T, V), target (B, T) int64, mask (B, T) float 0/1. A batch with no loss tokens gives a
    sum of exactly zero (never NaN) with a gradient of zero."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum(), m.sum()
