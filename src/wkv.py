"""WKV6 operator: one API, three backends (cuda, fla, torch).

Conventions: r, k, v, w are (B, T, H, N); w is the *raw* decay parameter, the per-step decay is
d = exp(-exp(w)); u (the bonus, ``time_faaaa``) is (H, N); the state S is (B, H, N, N) float32
indexed [key i, value j]:
    y_t[j] = sum_i r_t[i] * (S_{t-1}[i, j] + u[i] * k_t[i] * v_t[j])
    S_t[i, j] = d_t[i] * S_{t-1}[i, j] + k_t[i] * v_t[j]
"""
from __future__ import annotations

import torch
from torch import Tensor


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Return (y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32). PLACEHOLDER: naive loop."""
    B, T, H, N = r.shape
    dt = torch.float32 if r.dtype != torch.float64 else torch.float64
    S = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    rr, kk, vv, ww = (t.to(dt).unbind(1) for t in (r, k, v, w))
    uu = u.to(dt)
    ys = []
    for t in range(T):
        kv = kk[t].unsqueeze(-1) * vv[t].unsqueeze(-2)  # (B, H, N, N)
        ys.append(torch.einsum("bhi,bhij->bhj", rr[t], S + uu.unsqueeze(-1) * kv))
        S = torch.exp(-torch.exp(ww[t])).unsqueeze(-1) * S + kv
    return torch.stack(ys, 1).to(r.dtype), S
