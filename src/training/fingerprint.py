"""A content fingerprint of the base weights, recorded in training states: a run refuses to resume onto a
different base model. (Adapter files carry a shape fingerprint instead: src/adapters/files.py.)"""
from __future__ import annotations

import hashlib

from torch import nn


def base_content_fingerprint(model: nn.Module) -> str:
    """A cheap content hash of the base weights (names, shapes, dtypes and a strided sample of values), taken
    before adapters are injected. A run refuses to resume onto a different base model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{sample.sum().item():.6e}|{sample.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]
