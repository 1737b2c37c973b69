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

from src.adapters.config import PROJECTIONS
from src.adapters.inject import load_adapter_into
from src.checkpoint import load_tensors
from src.errors import CheckpointError
from src.quant import QuantLinear, QuantWeight, check_quant
from src.rwkv6 import RWKV6 as RWKV6Architecture
from src.rwkv6 import LayerState, RWKV6Config, base_state_dict

__all__ = ["RWKV6", "RWKV6Config", "LayerState", "base_state_dict"]


class RWKV6(RWKV6Architecture):
    """RWKV6 x060 (see src/rwkv6.py) with `from_checkpoint`."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        quant: str | None = None, **runtime: object) -> RWKV6:
        """Build a model sized from the checkpoint's tensor shapes and load it strictly, in `dtype`.

        `adapter`: an adapter .safetensors file applied unmerged on top. `quant`: None, or "int8" / "nf4" for a
        quantised frozen base: the eight attention and FFN projections are held quantised (bitsandbytes, see
        src/quant/weight.py), everything else in `dtype`; loaded layer by layer from the checkpoint (memory-
        mapped), never holding the whole dense model. `runtime`: wkv_backend, grad_cp."""
        quant = check_quant(quant)
        if quant is None:
            model = cls.from_base_checkpoint(path, dtype=dtype, **runtime)
        else:
            model = cls.from_quantized_checkpoint(path, quant, dtype=dtype, **runtime)
        if adapter is not None:
            load_adapter_into(model, adapter)
        return model

    @classmethod
    def from_quantized_checkpoint(cls, path: str | Path, quant: str, dtype: torch.dtype = torch.bfloat16,
                                  **runtime: object) -> RWKV6:
        """The base with its projections quantised (`quant` int8/nf4), read one tensor at a time: the keys and
        shapes are checked strictly first (nothing read), then each projection weight is read (memory-mapped
        .pth, or one safetensors tensor) and quantised, and every other tensor is copied in `dtype`."""
        with _LazyTensors(path) as lazy:
            meta_sd = {k: torch.empty(shape, device="meta") for k, shape in lazy.shapes.items()}
            cfg = RWKV6Config.from_state_dict(meta_sd, **runtime)
            with torch.device("meta"):
                model = cls(cfg)
            model.load_base_state_dict(meta_sd, source=str(path))  # strict key and shape check on meta tensors
            for i, block in enumerate(model.blocks):
                for proj in PROJECTIONS:
                    part, name = proj.split(".")
                    w = lazy.get(f"blocks.{i}.{proj}.weight")
                    setattr(getattr(block, part), name, QuantLinear(QuantWeight.from_weight(w, quant, dtype)))
                    del w
            for module_name, module in model.named_modules():
                for pname, p in list(module.named_parameters(recurse=False)):
                    t = lazy.get(f"{module_name}.{pname}" if module_name else pname)
                    setattr(module, pname, torch.nn.Parameter(torch.empty(t.shape, dtype=dtype).copy_(t),
                                                              requires_grad=p.requires_grad))
                    del t
        return model


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """A checkpoint's {tensor name: shape} without reading its data (the safetensors header, or a memory-mapped
    .pth). CheckpointError for a missing or unreadable file."""
    return _LazyTensors(path).shapes


class _LazyTensors:
    """A checkpoint's tensors read one at a time: `shapes` {name: shape} up front, `get(name)` a CPU tensor
    (memory-mapped for .pth/.pt, read from the file for .safetensors), checked to be finite floating point."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        if self.path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            if not self.path.is_file():
                raise CheckpointError(f"{self.path}: no such checkpoint file.")
            try:
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
                self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({e}). It is probably truncated "
                                      f"or corrupt: re-download or re-save it.") from e
            self._sd = None
        else:
            self._sd = load_tensors(self.path, mmap=True)
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}

    def get(self, name: str) -> torch.Tensor:
        t = self._sd[name] if self._sd is not None else self._file.get_tensor(name)
        if not t.is_floating_point():
            raise CheckpointError(f"{self.path}: {name} is {t.dtype}, not floating point (quantized?). Use an "
                                  f"fp32/bf16/fp16 x060 checkpoint.")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{self.path}: {name} has NaN/Inf values (not finite). The checkpoint is corrupt "
                                  f"or comes from a diverged run; use another one.")
        return t

    def __enter__(self) -> _LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sd = None
        self._file = None
