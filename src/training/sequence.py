"""The training objective of one micro-batch, over the whole sequence at once or in time chunks (--chunk_ctx).

Chunked, the sequence is cut into chunks of `chunk_ctx` tokens. The recurrent state (both token-shift states
and the WKV state of every layer) is carried from chunk to chunk without detaching, so the gradient flows through
it: full backpropagation through time, the same loss and gradients as the unchunked run. Each chunk's forward,
head and loss run under activation checkpointing: between the passes only the states at chunk boundaries are
kept, and backward recomputes one chunk at a time, so activation memory (logits included) grows with
`chunk_ctx`, not with the sequence length. Chunks after the batch's last loss token are skipped: no loss
depends on them. To keep both paths equal, L2Wrap acts on the positions up to that token in both: trailing
padding of SFT batches is not regularised (window data has no padding, so there it covers every position,
as in the official trainer).

Head chunks (head_chunk): the head and the loss run on `head_chunk` tokens at a time, each piece checkpointed,
so the (B, T, V) logits never exist at once (1 GiB in fp32 for one 4096-token sample at V = 65536); backward
recomputes one piece's logits at a time. The same loss, gradients and L2Wrap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from src.loss import L2Wrap, masked_token_loss_sum
from src.rwkv6 import RWKV6, LayerState


@dataclass
class SequenceLoss:
    """objective: what backward runs on (loss sum x scale, with L2Wrap); loss_sum and n_tokens (detached) for
    logging and validation."""

    objective: Tensor
    loss_sum: Tensor
    n_tokens: Tensor


def _head_loss(model: RWKV6, x: Tensor, target: Tensor, mask: Tensor, scale: float, l2_len: int,
               positions: int) -> tuple[Tensor, Tensor, Tensor]:
    """Head, masked cross-entropy sum x scale and L2Wrap (first `l2_len` positions) of features x (B, t, C)."""
    logits = model.head(x)  # (B, t, V)
    loss_sum, n = masked_token_loss_sum(logits, target, mask)
    objective = loss_sum * scale
    if l2_len > 0:
        objective = L2Wrap.apply(objective, logits[:, :l2_len], positions)
    return objective, loss_sum, n


def _chunk(model: RWKV6, idx: Tensor, target: Tensor, mask: Tensor, state: list[LayerState] | None, scale: float,
           l2_len: int, positions: int, head_chunk: int) -> tuple[Tensor, Tensor, Tensor, list[LayerState]]:
    """One time chunk: forward from `state`, then the head and loss (in pieces of head_chunk tokens when > 0)."""
    x, new_state = model.features(idx, state)  # (B, t, C)
    t = x.shape[1]
    if not head_chunk or head_chunk >= t:
        return (*_head_loss(model, x, target, mask, scale, l2_len, positions), new_state)
    objective = loss_sum = n_tokens = None
    for start in range(0, t, head_chunk):
        piece = slice(start, start + head_chunk)
        args = (model, x[:, piece], target[:, piece], mask[:, piece], scale, min(max(l2_len - start, 0), head_chunk),
                positions)
        obj, ls, n = (checkpoint(_head_loss, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _head_loss(*args))
        objective = obj if objective is None else objective + obj
        loss_sum = ls if loss_sum is None else loss_sum + ls
        n_tokens = n if n_tokens is None else n_tokens + n
    assert objective is not None and loss_sum is not None and n_tokens is not None
    return objective, loss_sum, n_tokens, new_state


def sequence_loss(model: RWKV6, idx: Tensor, target: Tensor, mask: Tensor, scale: float, l2wrap: bool,
                  chunk_ctx: int = 0, head_chunk: int = 0) -> SequenceLoss:
    """idx, target (B, T) int64, mask (B, T) 0/1. `scale` multiplies the batch's cross-entropy sum (the trainer
    passes 1 / step tokens x the frameworks' averaging factors). `chunk_ctx` 0 (or >= T): one pass through
    time; `head_chunk` 0: the head on the whole chunk at once."""
    B, T = idx.shape
    has_loss = (mask != 0).any(0).nonzero()
    end = int(has_loss[-1]) + 1 if len(has_loss) else 1  # one past the last loss token (at least 1)
    if not chunk_ctx or chunk_ctx >= T:
        objective, loss_sum, n, _ = _chunk(model, idx, target, mask, None, scale, end if l2wrap else 0, B * T,
                                           head_chunk)
        return SequenceLoss(objective, loss_sum.detach(), n.detach())
    objective = loss_sum = n_tokens = None
    state: list[LayerState] | None = None
    for start in range(0, end, chunk_ctx):
        piece = slice(start, min(start + chunk_ctx, T))
        l2_len = min(end - start, chunk_ctx) if l2wrap else 0
        args = (model, idx[:, piece], target[:, piece], mask[:, piece], state, scale, l2_len, B * T, head_chunk)
        if torch.is_grad_enabled():
            obj, ls, n, state = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            obj, ls, n, state = _chunk(*args)
        objective = obj if objective is None else objective + obj
        loss_sum = ls.detach() if loss_sum is None else loss_sum + ls.detach()
        n_tokens = n if n_tokens is None else n_tokens + n
    assert objective is not None and loss_sum is not None and n_tokens is not None
    return SequenceLoss(objective, loss_sum, n_tokens)
