"""Merging and unmerging as pure functions over tensors and state dicts, for any method: the entry points
of the streaming merge CLI, the trainer and the tests. They dispatch to the per-method math (Bone's in
src.adapters.bone, LoRA/PiSSA's in src.adapters.lora), which the layers' merged_weight() also call.
Math in fp32 (fp64 stays fp64), results in the base tensor's dtype."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from src.adapters.config import AdapterConfig
from src.adapters.methods import LAYER_TENSOR_NAMES, STATE_TENSOR_NAME, layer_class
from src.errors import AdapterError


def _layer(cfg: AdapterConfig) -> type:
    cls = layer_class(cfg.method)
    if cls is None:
        raise AdapterError(f"adapter method {cfg.method!r} has no weight to merge.")
    return cls


def merge_weight(weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
    """W' for one linear weight (out, in); `tensors` maps names ("bone", "lora_A", ...) to tensors."""
    return _layer(cfg).merge(weight, tensors, cfg)


def unmerge_weight(merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
    """The exact inverse of merge_weight (Bone: per-block solve; LoRA/PiSSA: subtraction)."""
    return _layer(cfg).unmerge(merged, tensors, cfg)


ADDED_SUFFIX = STATE_TENSOR_NAME  # tensors an adapter may add to a base that lacks them (state tuning)


@dataclass
class SplitAdapter:
    """An adapter's tensors by what they do to a base: `per_weight` {base weight: {suffix: tensor}} to merge,
    `parts` {base name: tensor} replacing base tensors (train_parts), `added` {name: tensor} new tensors
    (a trained initial state on a base without one)."""

    per_weight: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    parts: dict[str, Tensor] = field(default_factory=dict)
    added: dict[str, Tensor] = field(default_factory=dict)


def split_adapter_tensors(adapter: Mapping[str, Tensor], base_keys: set[str] | frozenset[str]) -> SplitAdapter:
    """Group adapter tensors by what they do to the base (see SplitAdapter). Names that are none of these raise
    AdapterError."""
    split = SplitAdapter()
    unknown = []
    for name, t in adapter.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in LAYER_TENSOR_NAMES and f"{prefix}.weight" in base_keys:
            split.per_weight.setdefault(f"{prefix}.weight", {})[suffix] = t
        elif name in base_keys:
            split.parts[name] = t
        elif suffix == ADDED_SUFFIX and f"{prefix}.time_faaaa" in base_keys:
            split.added[name] = t
        else:
            unknown.append(name)
    if unknown:
        raise AdapterError(f"adapter tensors {unknown[:10]} match no weight of the base model; "
                           f"the adapter was made for a different model.")
    return split


def merge_state_dict(base: Mapping[str, Tensor], adapter: Mapping[str, Tensor],
                     cfg: AdapterConfig) -> dict[str, Tensor]:
    """A new state dict: targeted weights merged, trained extra parts (train_parts) replaced, a trained initial
    state added (fp32, as `blocks.N.att.time_state`), the rest shared."""
    split = split_adapter_tensors(adapter, frozenset(base))
    out = dict(base)
    for key, tensors in split.per_weight.items():
        out[key] = merge_weight(base[key], tensors, cfg)
    for key, t in split.parts.items():
        out[key] = t.detach().to(base[key].dtype)
    for key, t in split.added.items():
        out[key] = t.detach().float()
    return out


def unmerge_state_dict(merged: Mapping[str, Tensor], adapter: Mapping[str, Tensor],
                       cfg: AdapterConfig) -> dict[str, Tensor]:
    """Inverse of merge_state_dict (an added initial state is removed again). Refuses adapters with trained extra
    parts (their old values are not stored)."""
    added = {k for k in adapter if k.endswith(f".{ADDED_SUFFIX}") and k in merged}
    split = split_adapter_tensors({k: v for k, v in adapter.items() if k not in added}, frozenset(merged))
    if split.parts:
        raise AdapterError(f"cannot unmerge: the adapter also trained {sorted(split.parts)[:5]} (train_parts="
                           f"{list(cfg.train_parts)}), and their original values are not stored in it.")
    out = {k: v for k, v in merged.items() if k not in added}
    for key, tensors in split.per_weight.items():
        out[key] = unmerge_weight(merged[key], tensors, cfg)
    return out
