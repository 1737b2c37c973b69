"""The public model API: `RWKV6`, the x060 architecture (src/rwkv6.py) plus loading from a checkpoint with an
optional adapter on top. It sits above the architecture and the adapters, so neither imports the other upward.

    from src.model import RWKV6
    model = RWKV6.from_checkpoint("RWKV-x060-World-1B6.pth", adapter="adapter-final.safetensors")
    logits = model(idx)                      # (B, T, V)
    logits, state = model(idx, state)        # recurrent form; start from model.init_state(B)
"""
from __future__ import annotations

from pathlib import Path

import torch

from src.adapters.inject import load_adapter_into
from src.errors import ConfigError
from src.rwkv6 import RWKV6 as RWKV6Architecture
from src.rwkv6 import LayerState, RWKV6Config, base_state_dict

__all__ = ["RWKV6", "RWKV6Config", "LayerState", "base_state_dict"]


class RWKV6(RWKV6Architecture):
    """RWKV6 x060 (see src/rwkv6.py) with `from_checkpoint`."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        quant: str | None = None, **runtime: object) -> RWKV6:
        """Build a model sized from the checkpoint's tensor shapes and load it strictly, in `dtype`.

        `adapter`: an adapter .safetensors file applied unmerged on top. `quant`: a quantised frozen base
        (not available yet: None). `runtime`: wkv_backend, grad_cp."""
        if quant is not None:
            raise ConfigError(f"quant={quant!r}: quantised bases are not supported in this version; use quant=None.")
        model = cls.from_base_checkpoint(path, dtype=dtype, **runtime)
        if adapter is not None:
            load_adapter_into(model, adapter)
        return model
