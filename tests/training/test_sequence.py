"""src/training/sequence.py: chunked training (--chunk_ctx) equals the unchunked run exactly (full backpropagation
through the carried state), keeps only chunk-boundary states between the passes, and stays finite at 32k tokens."""
from __future__ import annotations

import pytest
import torch

from src.model import RWKV6
from src.training.sequence import sequence_loss
from tests.tiny import tiny_config, tiny_state_dict

VOCAB = 97


def _model(n_embd: int = 64, n_layer: int = 2) -> RWKV6:
    cfg = tiny_config(n_layer=n_layer, n_embd=n_embd, vocab_size=VOCAB, d_mix=8, d_decay=16)
    model = RWKV6(cfg)
    model.load_base_state_dict(tiny_state_dict(cfg, seed=3))
    return model


def _batch(B: int, T: int, seed: int, loss_until: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    if loss_until is not None:
        mask[:, loss_until:] = 0
    return tokens[:, :-1], tokens[:, 1:], mask


def _run(model: RWKV6, batch: tuple[torch.Tensor, ...], chunk: int,
         head_chunk: int = 0) -> tuple[float, float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = sequence_loss(model, *batch, scale=1 / 50, l2wrap=True, chunk_ctx=chunk, head_chunk=head_chunk)
    out.objective.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.objective), float(out.loss_sum), grads


@pytest.mark.parametrize("chunk, head_chunk, loss_until", [(32, 0, None), (40, 0, None), (16, 0, 50), (96, 0, None),
                                                         (0, 24, None), (0, 7, 50), (40, 16, 60)])
def test_chunked_loss_and_gradients_equal_the_unchunked_run(chunk: int, head_chunk: int,
                                                            loss_until: int | None) -> None:
    """Time chunks (carried state) and head chunks (logits in pieces) give the plain run's loss and gradients."""
    model = _model()
    batch = _batch(B=2, T=96, seed=chunk + head_chunk, loss_until=loss_until)
    ref_obj, ref_sum, ref = _run(model, batch, chunk=0)
    obj, loss_sum, got = _run(model, batch, chunk=chunk, head_chunk=head_chunk)
    assert obj == pytest.approx(ref_obj, rel=1e-5) and loss_sum == pytest.approx(ref_sum, rel=1e-5)
    assert got.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp(min=1e-30)
        assert err <= 1e-5, (name, float(err))
    # the gradient reaches the first chunk's tokens through the carried state: the embedding of a token that
    # appears only in the first chunk is trained by losses of later chunks too
    assert ref["blocks.0.att.time_faaaa"].abs().max() > 0


def test_truncating_the_state_gradient_would_be_detected() -> None:
    """Control: detaching the state between chunks changes the gradients well beyond the tolerance above,
    so the equality test can fail."""
    model = _model()
    batch = _batch(B=2, T=96, seed=7)
    _, _, ref = _run(model, batch, chunk=0)
    model.zero_grad(set_to_none=True)
    idx, target, mask = batch
    state, total = None, 0.0
    for start in range(0, 96, 32):
        piece = slice(start, start + 32)
        logits, state = model.forward_state(idx[:, piece], state)
        state = [tuple(t.detach() for t in s) for s in state]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[:, piece].flatten(),
                                                          reduction="none").mul(mask[:, piece].flatten()).sum()
    (total / 50).backward()
    name = "blocks.0.att.key.weight"
    err = (model.get_parameter(name).grad - ref[name]).norm() / ref[name].norm()
    assert err > 1e-3


def test_only_chunk_boundary_states_are_kept_between_the_passes() -> None:
    """Bytes saved for backward: unchunked they grow with T; chunked they are the boundary states (and token
    ids) alone, far below one chunk's activations."""
    model = _model()

    def saved_bytes(T: int, chunk: int, head_chunk: int = 0) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_loss(model, *_batch(1, T, seed=T), scale=1.0, l2wrap=True, chunk_ctx=chunk, head_chunk=head_chunk)
        return total

    plain_1k, plain_4k = saved_bytes(1024, 0), saved_bytes(4096, 0)
    assert saved_bytes(1024, 0, head_chunk=128) < plain_1k - 1024 * VOCAB * 4  # the fp32 logits are not kept
    chunked_1k, chunked_4k = saved_bytes(1024, 256), saved_bytes(4096, 256)
    assert plain_4k > 3.5 * plain_1k
    assert chunked_4k < plain_1k / 4 and chunked_1k < plain_1k / 10


@pytest.mark.slow
def test_32k_tokens_stay_finite() -> None:
    model = _model(n_embd=64, n_layer=2)
    idx, target, mask = _batch(1, 32768, seed=1)
    out = sequence_loss(model, idx, target, mask, scale=1 / float(mask.sum()), l2wrap=True, chunk_ctx=2048)
    out.objective.backward()
    assert torch.isfinite(out.objective)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
