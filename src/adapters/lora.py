"""LoRA and PiSSA (the baselines): their merge math and the LoRALinear layer.

LoRA: W' = W + s·B·A with A (r, in), B (out, r), s = alpha / r; A is Kaiming-uniform, B = 0.
PiSSA: A0, B0 hold the principal part of W (top-r singular triplets from torch.svd_lowrank, split so that
s·B0·A0 = U_r·S_r·V_rᵀ); training starts from A = A0, B = B0 with the residual W − s·B0·A0 in the frozen
weight. The adapter file stores A, B and A0, B0 (`pissa_A0`, `pissa_B0`), so it merges onto the ORIGINAL
base: W' = W + s·(B·A − B0·A0); loading it onto the original base rebuilds the residual exactly from the
stored A0, B0 (no SVD at load time).

On a quantised base (src/quant) the frozen weight stays the quantised W: PiSSA's SVD is taken from the
dequantised weight (as QPiSSA does) and the principal part s·B0·A0 is subtracted in forward instead of from W.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.adapters.config import AdapterConfig
from src.adapters.layer import AdapterLayer, math_dtype
from src.errors import AdapterError
from src.quant import QuantWeight, dense, is_quantized, linear

PISSA_SVD_NITER = 4  # subspace iterations of torch.svd_lowrank, as in the PiSSA paper's fast init


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """s·B·A: (out, r) @ (r, in) -> (out, in)."""
    return scaling * (lora_B @ lora_A)


def _delta(tensors: dict[str, Tensor], scaling: float, pissa: bool, dtype: torch.dtype) -> Tensor:
    delta = lora_delta(tensors["lora_A"].to(dtype), tensors["lora_B"].to(dtype), scaling)
    if pissa:
        delta = delta - lora_delta(tensors["pissa_A0"].to(dtype), tensors["pissa_B0"].to(dtype), scaling)
    return delta


def merge_lora(weight: Tensor, tensors: dict[str, Tensor], scaling: float, pissa: bool) -> Tensor:
    """W + s·B·A (PiSSA: minus s·B0·A0, the part that training kept out of W), fp32 math, W's dtype."""
    dtype = math_dtype(weight.dtype)
    with torch.no_grad():
        return (weight.to(dtype) + _delta(tensors, scaling, pissa, dtype)).to(weight.dtype)


def unmerge_lora(merged: Tensor, tensors: dict[str, Tensor], scaling: float, pissa: bool) -> Tensor:
    """Inverse of merge_lora (subtraction), fp32 math, the merged weight's dtype."""
    dtype = math_dtype(merged.dtype)
    with torch.no_grad():
        return (merged.to(dtype) - _delta(tensors, scaling, pissa, dtype)).to(merged.dtype)


class LoRALinear(AdapterLayer):
    """LoRA and PiSSA: frozen `weight` (out, in) plus `lora_A` (r, in) and `lora_B` (out, r); PiSSA layers also
    hold the frozen buffers `pissa_A0`, `pissa_B0` and a residual `weight`."""

    methods = ("lora", "pissa")
    every_name = ("lora_A", "lora_B", "pissa_A0", "pissa_B0")

    def __init__(self, weight: nn.Parameter | QuantWeight, cfg: AdapterConfig):
        super().__init__(weight, cfg)
        self.subtract_principal = False  # PiSSA on a quantised W: forward subtracts s·B0·A0
        r, kw = cfg.lora_r, self.tensor_kwargs()
        self.scaling = cfg.lora_scaling
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if cfg.method == "pissa":
            self.register_buffer("pissa_A0", torch.zeros(r, self.in_features, **kw))
            self.register_buffer("pissa_B0", torch.zeros(self.out_features, r, **kw))
        self.dropout = nn.Dropout(cfg.lora_dropout)

    @classmethod
    def trainable_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        return ("lora_A", "lora_B")

    @classmethod
    def frozen_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        return ("pissa_A0", "pissa_B0") if cfg.method == "pissa" else ()

    @classmethod
    def merge(cls, weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return merge_lora(weight, dict(tensors), cfg.lora_scaling, pissa=cfg.method == "pissa")

    @classmethod
    def unmerge(cls, merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        return unmerge_lora(merged, dict(tensors), cfg.lora_scaling, pissa=cfg.method == "pissa")

    @torch.no_grad()
    def after_load(self) -> None:
        """PiSSA: the file holds A0, B0 for the original base; take the principal part out of the weight."""
        if self.cfg.method == "pissa":
            self.remove_principal_part()

    @torch.no_grad()
    def initialize(self) -> None:
        """LoRA: A Kaiming-uniform (as nn.Linear), B = 0. PiSSA: principal init and residual weight."""
        if self.cfg.method == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            return
        r = self.cfg.lora_r
        if r > min(self.in_features, self.out_features):
            raise AdapterError(f"PiSSA rank r={r} exceeds min(out, in) = {min(self.in_features, self.out_features)} "
                               f"of a {self.out_features}x{self.in_features} weight; use a smaller lora_r.")
        w = dense(self.weight, torch.float32)
        q = min(2 * r, self.in_features, self.out_features)
        u, s, v = torch.svd_lowrank(w, q=q, niter=PISSA_SVD_NITER)  # w ≈ u·diag(s)·vᵀ
        root = (s[:r] / self.scaling).sqrt()
        self.pissa_A0.copy_(v[:, :r].t() * root[:, None])  # (r, in)
        self.pissa_B0.copy_(u[:, :r] * root[None, :])  # (out, r)
        self.lora_A.copy_(self.pissa_A0)
        self.lora_B.copy_(self.pissa_B0)
        self.remove_principal_part()

    @torch.no_grad()
    def remove_principal_part(self) -> None:
        """PiSSA: weight <- weight − s·B0·A0 (done once, at init or after loading A0, B0 onto the original base)."""
        if is_quantized(self.weight):
            self.subtract_principal = True
            return
        init = {"lora_A": self.pissa_A0, "lora_B": self.pissa_B0}
        self.weight.copy_(unmerge_lora(self.weight, init, self.scaling, pissa=False))

    def forward(self, x: Tensor) -> Tensor:
        y = linear(x, self.weight)  # (..., out)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype)) * self.scaling  # (..., r)
        if self.subtract_principal:
            h0 = F.linear(x, self.pissa_A0.to(x.dtype)) * self.scaling
            y = y - F.linear(h0, self.pissa_B0.to(h0.dtype))
        return y.add_(F.linear(h, self.lora_B.to(h.dtype)))

    def merged_weight(self) -> Tensor:
        """W + s·B·A in the base dtype (what this layer applies; for PiSSA W is the residual)."""
        weight = dense(self.weight)
        if self.subtract_principal:
            weight = unmerge_lora(weight, {"lora_A": self.pissa_A0, "lora_B": self.pissa_B0}, self.scaling, pissa=False)
        return merge_lora(weight, {"lora_A": self.lora_A, "lora_B": self.lora_B}, self.scaling, pissa=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg.method}, "
                f"r={self.cfg.lora_r}, alpha={self.cfg.lora_alpha}, dropout={self.cfg.lora_dropout}")
