"""Float64 oracles for WKV6, written straight from the recurrence and independent of src/.

`wkv6_loop`: the naive per-step loop (differentiable through autograd).
`wkv6_loop_backward`: the hand-derived backward recurrences in float64, including the
    w-gradient identity the CUDA kernel uses (suffix sums of per-step terms instead of pairing
    S_{t-1} with G_t), so that derivation is checked on CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor


def wkv6_loop(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """r, k, v, w (B, T, H, N), w raw; u (H, N); state (B, H, N, N) [key, value] or None.

    Returns y (B, T, H, N) and the final state, both float64.
    """
    B, T, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=torch.float64) if state is None else state.double()
    u64 = u.double()
    ys = []
    for r_t, k_t, v_t, w_t in zip(*(x.double().unbind(1) for x in (r, k, v, w)), strict=True):  # each (B, H, N)
        kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, N, N)
        ys.append(torch.einsum("bhi,bhij->bhj", r_t, S + u64.unsqueeze(-1) * kv))
        S = torch.exp(-torch.exp(w_t)).unsqueeze(-1) * S + kv
    return torch.stack(ys, 1), S


def wkv6_loop_backward(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, gy: Tensor, gstate: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (gr, gk, gv, gw, gu, gstate0) of <y, gy> + <S_T, gstate>, all float64.

    Mirrors cuda/wkv6.cu phase by phase. With Q_t = r_t * (S_{t-1} gy_t) for t < T,
    Q_T = rowsum(S_{T-1} * gstate) and P_s = k_s * (G_s v_s):
        d loss / d log d_t = sum_{tau > t} Q_tau - sum_{s >= t} P_s.
    """
    r, k, v, w, u, state, gy, gstate = (x.double() for x in (r, k, v, w, u, state, gy, gstate))
    B, T, H, N = r.shape
    d = torch.exp(-torch.exp(w))
    gr, gk, gv, gw, q_terms = (torch.zeros_like(r) for _ in range(5))
    gu = torch.zeros(B, H, N, dtype=torch.float64)

    # Phase 1, forward in time, state rows S[i, :]: gr, Q, gu.
    S = state.clone()
    for t in range(T):
        s_gy = torch.einsum("bhij,bhj->bhi", S, gy[:, t])
        v_gy = (v[:, t] * gy[:, t]).sum(-1, keepdim=True)  # (B, H, 1)
        gr[:, t] = s_gy + u * k[:, t] * v_gy
        q_terms[:, t] = r[:, t] * s_gy
        gu += r[:, t] * k[:, t] * v_gy
        S = d[:, t].unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
    q_next = (S * gstate).sum(-1)  # Q_T

    # Phase 2, backward in time, gradient rows G[i, :]: gk and the w-gradient.
    G = gstate.clone()
    glogd = torch.zeros(B, H, N, dtype=torch.float64)
    for t in reversed(range(T)):
        g_v = torch.einsum("bhij,bhj->bhi", G, v[:, t])
        v_gy = (v[:, t] * gy[:, t]).sum(-1, keepdim=True)
        gk[:, t] = g_v + u * r[:, t] * v_gy
        glogd = glogd + q_next - k[:, t] * g_v
        q_next = q_terms[:, t]
        gw[:, t] = glogd * -torch.exp(w[:, t])
        G = d[:, t].unsqueeze(-1) * G + r[:, t].unsqueeze(-1) * gy[:, t].unsqueeze(-2)

    # Phase 3, backward in time, gradient columns G[:, j]: gv and the initial-state gradient.
    G = gstate.clone()
    for t in reversed(range(T)):
        bonus = (u * r[:, t] * k[:, t]).sum(-1, keepdim=True)  # (B, H, 1)
        gv[:, t] = torch.einsum("bhi,bhij->bhj", k[:, t], G) + gy[:, t] * bonus
        G = d[:, t].unsqueeze(-1) * G + r[:, t].unsqueeze(-1) * gy[:, t].unsqueeze(-2)
    return gr, gk, gv, gw, gu.sum(0), G
