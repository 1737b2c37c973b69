"""Training loss: masked token cross-entropy summed per batch (the trainer divides by the loss-token count
of the whole optimizer step), and L2Wrap, the official RWKV logit regulariser."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds `factor * max_logit` to the gradient of each position's
    largest logit (factor = 1e-4 / (B*T)), discouraging logits from drifting up (official RWKV trainer)."""

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        B, T = logits.shape[0], logits.shape[1]
        factor = 1e-4 / (B * T)
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, glogits


def masked_token_loss_sum(logits: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropy over positions where mask=1, number of such positions).

    logits (B, T, V), target (B, T) int64, mask (B, T) float 0/1. A batch with no loss tokens gives a
    sum of exactly zero (never NaN) with a gradient of zero."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum(), m.sum()
