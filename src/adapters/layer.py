"""The adapter-layer base class. Every method that adapts a projection is one subclass of `AdapterLayer`: an
nn.Linear(bias=False) replacement that owns the frozen `weight` under nn.Linear's name (so base checkpoints load
strictly) and declares its own tensors. The class, not a central table, says which tensors it has, which of
them train, how to initialise them from the weight, and how to merge and unmerge them; injection, the adapter
file, merging and the tests all ask the class (the spirit of torchtune's `adapter_params()` and peft's
`adapter_layer_names`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from src.adapters.config import AdapterConfig
from src.quant import QuantWeight, dense


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter math runs in for a base of `dtype`: fp32, or fp64 for an fp64 base."""
    return torch.promote_types(dtype, torch.float32)


class AdapterLayer(nn.Module):
    """Base of the adapter layers. Subclasses set `methods` (the --peft names they implement), create their
    tensors in __init__ (trainable ones as Parameters, frozen ones as buffers) and implement `trainable_names`,
    `forward`, `merge` and `unmerge`; `frozen_names`, `initialize`, `after_load` and `check_targets` have
    defaults."""

    methods: ClassVar[tuple[str, ...]] = ()
    every_name: ClassVar[tuple[str, ...]] = ()  # every tensor name any configuration of this class can have

    def __init__(self, weight: nn.Parameter | QuantWeight, cfg: AdapterConfig):
        """`weight`: the frozen base weight, a Parameter or a quantised QuantWeight (src/quant)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.cfg = cfg
        self.weight = weight

    def tensor_kwargs(self) -> dict[str, object]:
        """device and dtype for new adapter tensors: the weight's device, fp32 math (fp64 stays fp64)."""
        return {"device": self.weight.device, "dtype": math_dtype(self.weight.dtype)}

    # -- what the layer holds
    @classmethod
    def trainable_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        """Names of the trainable adapter tensors for `cfg`."""
        raise NotImplementedError

    @classmethod
    def frozen_names(cls, cfg: AdapterConfig) -> tuple[str, ...]:
        """Frozen adapter tensors that the adapter file stores too (needed to merge)."""
        return ()

    def adapter_tensors(self) -> dict[str, Tensor]:
        """{name: tensor} of every adapter tensor (trainable and frozen), as the merge math takes them."""
        return {n: getattr(self, n) for n in (*self.trainable_names(self.cfg), *self.frozen_names(self.cfg))}

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """{name: parameter} of the trainable adapter tensors."""
        return {n: getattr(self, n) for n in self.trainable_names(self.cfg)}

    # -- lifecycle
    @classmethod
    def check_targets(cls, shapes: Mapping[str, tuple[int, int]], cfg: AdapterConfig) -> None:
        """Raise AdapterError when `cfg` cannot adapt linears of these {name: (out, in)} shapes."""

    @torch.no_grad()
    def initialize(self) -> None:
        """Initialise the adapter tensors for training (called once after injection, not when loading)."""

    @torch.no_grad()
    def after_load(self) -> None:
        """Called after the adapter tensors were loaded from a file."""

    # -- the math
    @classmethod
    def merge(cls, weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        """W' = what the layer applies, from the frozen base weight and the adapter tensors (base dtype)."""
        raise NotImplementedError

    @classmethod
    def unmerge(cls, merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
        """The exact inverse of merge."""
        raise NotImplementedError

    def merged_weight(self) -> Tensor:
        """W' in the base dtype (what this layer applies)."""
        return self.merge(dense(self.weight), self.adapter_tensors(), self.cfg)
