"""A frozen projection weight held quantised with bitsandbytes (int8 or nf4), and the linear layer that uses it.

`QuantWeight` is an nn.Module that stands where a frozen nn.Linear weight Parameter would: it has the weight's
`shape`, `dtype` (the precision the rest of the model runs in), `device` and `is_meta`, and computes with the
weight only through

    matmul(x)    = x·Wᵀ      (forward of a linear)
    matmul_t(g)  = g·W       (gradient of its input)
    dequantize() = W         (one layer at a time, for methods that need the dense weight)

where W = deq(Q(W₀)) is bitsandbytes' own dequantisation of the stored codes:
  int8  row-wise absmax (bitsandbytes.functional.int8_vectorwise_quant): W[o, :] = CB[o, :]·SCB[o]/127;
        1 byte per weight plus 4 bytes per output row.
  nf4   blockwise NF4 (bitsandbytes.functional.quantize_4bit, blocksize 64, no double quantisation):
        4 bits per weight plus an fp32 absmax per 64 weights (0.5625 bytes per weight).

The matmuls never keep a dense weight: int8 multiplies by the int8 codes cast to the compute dtype and scales
the rows; nf4 dequantises into a temporary (one layer) that is freed on return. `QuantLinear` is the frozen
projection (y = x·Wᵀ, dx = dy·W through `quant_linear`, nothing weight-sized saved for backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import ConfigError

QUANTS = ("int8", "nf4")
NF4_BLOCKSIZE = 64
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes dequantize_4bit writes
INT8_SCALE = 1.0 / 127.0  # bitsandbytes' int8_vectorwise_dequant: CB · (SCB · 7.874015718698502e-3)


def check_quant(quant: str | None) -> str | None:
    """None / "none" -> None; "int8" / "nf4" as given; ConfigError otherwise."""
    if quant is None or quant == "none":
        return None
    if quant not in QUANTS:
        raise ConfigError(f"quant {quant!r} is unknown; use none, {' or '.join(QUANTS)}.")
    return quant


def _bnb_functional():  # noqa: ANN202 - the bitsandbytes.functional module
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # pragma: no cover - a requirement
        raise ConfigError(f"a quantised base (--quant) needs bitsandbytes: pip install bitsandbytes ({e}).") from e
    return bnbf


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class QuantWeight(nn.Module):
    """A frozen (out, in) weight stored quantised; see the module docstring. Buffers: int8 `qdata` (out, in)
    int8 and `scale` (out,) fp32; nf4 `qdata` (out·in/2, 1) uint8, `absmax` (out·in/64,) fp32, `code` (16,)."""

    def __init__(self, quant: str, shape: tuple[int, int], dtype: torch.dtype, buffers: dict[str, Tensor]):
        super().__init__()
        self.quant = quant
        self._shape = torch.Size(shape)
        self._dtype = dtype
        for name, t in buffers.items():
            self.register_buffer(name, t)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: Tensor, quant: str, dtype: torch.dtype | None = None) -> QuantWeight:
        """Quantise a dense (out, in) weight (any float dtype, any device bitsandbytes runs on). The codes are
        computed from the fp32 values; `dtype` (default: the weight's) is the dtype `dequantize` returns."""
        quant = check_quant(quant)
        if quant is None:
            raise ConfigError("QuantWeight needs quant int8 or nf4.")
        if weight.dim() != 2:
            raise ConfigError(f"only 2-D weights are quantised, got shape {tuple(weight.shape)}.")
        dtype = weight.dtype if dtype is None else dtype
        bnbf = _bnb_functional()
        w = weight.detach().to(torch.float32).contiguous()
        if quant == "int8":
            cb, scb, _ = bnbf.int8_vectorwise_quant(w)
            buffers = {"qdata": cb, "scale": scb.float()}
        else:
            if w.numel() % NF4_BLOCKSIZE:
                raise ConfigError(f"nf4 needs a weight size divisible by {NF4_BLOCKSIZE}, got {tuple(w.shape)}.")
            packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
            buffers = {"qdata": packed, "absmax": state.absmax.float(), "code": state.code.float()}
        del w
        return cls(quant, tuple(weight.shape), dtype, buffers)

    # -- what it looks like to the layers that hold it (as a weight tensor would)
    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def is_meta(self) -> bool:
        return self.qdata.is_meta

    @property
    def requires_grad(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes of the quantised weight including its quantisation state."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- the math
    def _row_scale(self, dtype: torch.dtype) -> Tensor:
        return (self.scale.float() * INT8_SCALE).to(dtype)  # (out,)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out, in) weight bitsandbytes' dequantisation gives, in `dtype` (default: self.dtype)."""
        dtype = self.dtype if dtype is None else dtype
        bnbf = _bnb_functional()
        with torch.no_grad():
            if self.quant == "int8":
                return bnbf.int8_vectorwise_dequant(self.qdata, self.scale.float()).to(dtype)
            state = bnbf.QuantState(absmax=self.absmax.float(), shape=self._shape, code=self.code.float(),
                                    blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                    dtype=dtype if dtype in _BNB_DTYPES else torch.float32)
            return bnbf.dequantize_4bit(self.qdata, state).to(dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """x·Wᵀ in x's dtype: (..., in) -> (..., out). No autograd (use quant_linear for that)."""
        with torch.no_grad():
            if self.quant == "int8":
                return F.linear(x, self.qdata.to(x.dtype)).mul_(self._row_scale(x.dtype))
            return F.linear(x, self.dequantize(x.dtype))

    def matmul_t(self, g: Tensor) -> Tensor:
        """g·W in g's dtype: (..., out) -> (..., in). No autograd."""
        with torch.no_grad():
            if self.quant == "int8":
                return (g * self._row_scale(g.dtype)) @ self.qdata.to(g.dtype)
            return g @ self.dequantize(g.dtype)

    def extra_repr(self) -> str:
        return f"quant={self.quant}, shape={tuple(self._shape)}, dtype={self._dtype}"


class QuantLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ on a QuantWeight; backward dx = dy·W. Saves nothing weight-sized (W stays quantised)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: QuantWeight) -> Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = weight.matmul(x.to(dtype))
        ctx.weight, ctx.compute_dtype, ctx.x_dtype = weight, dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor, None]:
        with torch.autocast(dy.device.type, enabled=False):
            dx = ctx.weight.matmul_t(dy.to(ctx.compute_dtype))
        return dx.to(ctx.x_dtype), None


def quant_linear(x: Tensor, weight: QuantWeight) -> Tensor:
    """x·Wᵀ with autograd to x (the weight is frozen)."""
    return QuantLinearFunction.apply(x, weight)


def linear(x: Tensor, weight: Tensor | QuantWeight) -> Tensor:
    """x·Wᵀ for a dense or a quantised weight, with autograd to x."""
    return quant_linear(x, weight) if isinstance(weight, QuantWeight) else F.linear(x, weight)


def dense(weight: Tensor | QuantWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight as a dense tensor (a quantised one dequantised, one layer at a time), in `dtype` if given."""
    if isinstance(weight, QuantWeight):
        return weight.dequantize(dtype)
    return weight if dtype is None else weight.to(dtype)


def is_quantized(weight: object) -> bool:
    return isinstance(weight, QuantWeight)


class QuantLinear(nn.Module):
    """A frozen bias-free projection whose weight is a QuantWeight (stands for nn.Linear(bias=False))."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return quant_linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.weight.quant}"


@torch.no_grad()
def quantize_dequantize(weight: Tensor, quant: str | None) -> Tensor:
    """deq(Q(W)) in W's dtype: the dense base an adapter trained on a quantised base saw (merge target of
    `merge_bone.py --quant`); W itself for quant None. Deterministic: equals what loading with `quant` holds."""
    quant = check_quant(quant)
    if quant is None:
        return weight
    return QuantWeight.from_weight(weight, quant).dequantize(weight.dtype)


def quantized_bytes(shape: tuple[int, int], quant: str) -> int:
    """Bytes a QuantWeight of this shape holds (codes plus quantisation state)."""
    out_f, in_f = shape
    n = out_f * in_f
    if quant == "int8":
        return n + 4 * out_f
    return n // 2 + 4 * math.ceil(n / NF4_BLOCKSIZE) + 4 * 16
