"""MiSS in peft's default mode (peft `MissConfig(init_weights=True)`, the mode the official RWKV wiki teaches), and
the MiSSLinear layer. Bone = DiSHA = MiSS: the block-affine Bone of src/adapters/bone.py is peft's MiSS "bat" mode
(with col grouping); this module is the cheaper default mode.

One shard D = `miss_block` (r, out), shared across the input: the weight update repeats Dᵀ along the input,

    ΔW[o, i] = D[i mod r, o],   W' = W + ΔW,

so y = x·W'ᵀ = x·Wᵀ + (Σ_c x_c)·D, where x_c are the r-wide chunks of x (the last one zero-padded when r does not
divide in). Training uses that factored form: a fold of x to (…, r) and one (…, r)·(r, out) product, saved tensors
(…, r) plus D — LoRA's cost at rank r. D starts at zero (the layer starts equal to the base). Merging adds ΔW,
unmerging subtracts it (exact up to rounding). Math in fp32 (fp64 stays fp64), results in the weight's dtype.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.adapters.config import AdapterConfig
from src.adapters.layer import AdapterLayer, math_dtype
from src.errors import AdapterError
from src.quant import linear


def miss_delta(block: Tensor, in_features: int) -> Tensor:
    """ΔW (out, in) of a shard D (r, out): ΔW[o, i] = D[i mod r, o]."""
    r = block.shape[0]
    return block.t().repeat(1, -(-in_features // r))[:, :in_features]


def fold(x: Tensor, r: int) -> Tensor:
    """Σ_c x_c: (…, in) -> (…, r), the r-wide chunks of x summed (x zero-padded to a multiple of r)."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (-1, r)).sum(-2)


def merge_miss(weight: Tensor, block: Tensor) -> Tensor:
    dtype = math_dtype(weight.dtype)
    with torch.no_grad():
        return (weight.to(dtype) + miss_delta(block.to(dtype), weight.shape[1])).to(weight.dtype)


def unmerge_miss(merged: Tensor, block: Tensor) -> Tensor:
    dtype = math_dtype(merged.dtype)
    with torch.no_grad():
        return (merged.to(dtype) - miss_delta(block.to(dtype), merged.shape[1])).to(merged.dtype)


class MiSSLinear(AdapterLayer):
    """MiSS (peft default mode): frozen `weight` (out, in) plus `miss_block` (r, out), zero-initialised."""

    methods = ("miss",)
    every_name = ("miss_block",)

    def __init__(self, weight: nn.Parameter, cfg: AdapterConfig):
        super().__init__(weight, cfg)
        self.miss_block = nn.Parameter(torch.zeros(cfg.miss_r, self.out_features, **self.tensor_kwargs()))

    @classmethod
    def trainable_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        return ("miss_block",)

    @classmethod
    def check_targets(cls, shapes: Mapping[str, tuple[int, int]], cfg: AdapterConfig) -> None:
        """r must not exceed any targeted layer's input size (rows of D past it would never train)."""
        bad = [f"{name} (in={i})" for name, (_, i) in shapes.items() if cfg.miss_r > i]
        if bad:
            raise AdapterError(f"MiSS rank r={cfg.miss_r} (--miss_r) exceeds the input size of {', '.join(bad[:4])}; "
                               f"use r <= {min(i for _, i in shapes.values())}.")

    @classmethod
    def merge(cls, weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return merge_miss(weight, tensors["miss_block"])

    @classmethod
    def unmerge(cls, merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return unmerge_miss(merged, tensors["miss_block"])

    def forward(self, x: Tensor) -> Tensor:
        y = linear(x, self.weight)  # (…, out); a quantised W (src/quant) too
        s = fold(x, self.cfg.miss_r)  # (…, r)
        return y + torch.matmul(s, self.miss_block.to(s.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method=miss, r={self.cfg.miss_r}"
