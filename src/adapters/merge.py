"""Merging and unmerging as pure functions over tensors and state dicts, for any method: the entry points
of the streaming merge CLI, the trainer and the tests. They dispatch to the per-method math (Bone's in
src.adapters.bone, LoRA/PiSSA's in src.adapters.lora), which the layers' merged_weight() also call.
Math in fp32 (fp64 stays fp64), results in the base tensor's dtype."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from src.adapters.bone import merge_bone, unmerge_bone
from src.adapters.config import ALL_SUFFIXES, BONE_METHODS, AdapterConfig
from src.adapters.lora import merge_lora, unmerge_lora
from src.errors import AdapterError


def merge_weight(weight: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
    """W' for one linear weight (out, in); `tensors` maps suffixes ("bone", "lora_A", ...) to tensors."""
    if cfg.method in BONE_METHODS:
        return merge_bone(weight, dict(tensors), cfg.method, cfg.grouping)
    if cfg.method in ("lora", "pissa"):
        return merge_lora(weight, dict(tensors), cfg.lora_scaling, pissa=cfg.method == "pissa")
    raise AdapterError(f"adapter method {cfg.method!r} has no weight to merge.")


def unmerge_weight(merged: Tensor, tensors: Mapping[str, Tensor], cfg: AdapterConfig) -> Tensor:
    """The exact inverse of merge_weight (Bone: per-block solve; LoRA/PiSSA: subtraction)."""
    if cfg.method in BONE_METHODS:
        return unmerge_bone(merged, dict(tensors), cfg.method, cfg.grouping)
    if cfg.method in ("lora", "pissa"):
        return unmerge_lora(merged, dict(tensors), cfg.lora_scaling, pissa=cfg.method == "pissa")
    raise AdapterError(f"adapter method {cfg.method!r} has no weight to unmerge.")


def split_adapter_tensors(
    adapter: Mapping[str, Tensor], base_keys: set[str] | frozenset[str]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Group adapter tensors by base weight: ({"blocks.0.att.key.weight": {"bone": t}}, {train-part name: t}).
    Names that are neither an adapter tensor of a base weight nor a base tensor raise AdapterError."""
    per_weight: dict[str, dict[str, Tensor]] = {}
    parts: dict[str, Tensor] = {}
    unknown = []
    for name, t in adapter.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in ALL_SUFFIXES and f"{prefix}.weight" in base_keys:
            per_weight.setdefault(f"{prefix}.weight", {})[suffix] = t
        elif name in base_keys:
            parts[name] = t
        else:
            unknown.append(name)
    if unknown:
        raise AdapterError(f"adapter tensors {unknown[:10]} match no weight of the base model; "
                           f"the adapter was made for a different model.")
    return per_weight, parts


def merge_state_dict(base: Mapping[str, Tensor], adapter: Mapping[str, Tensor], cfg: AdapterConfig) -> dict[str, Tensor]:
    """A new state dict: targeted weights merged, trained extra parts (train_parts) replaced, the rest shared."""
    per_weight, parts = split_adapter_tensors(adapter, frozenset(base))
    out = dict(base)
    for key, tensors in per_weight.items():
        out[key] = merge_weight(base[key], tensors, cfg)
    for key, t in parts.items():
        out[key] = t.detach().to(base[key].dtype)
    return out


def unmerge_state_dict(merged: Mapping[str, Tensor], adapter: Mapping[str, Tensor], cfg: AdapterConfig) -> dict[str, Tensor]:
    """Inverse of merge_state_dict. Refuses adapters with trained extra parts (their old values are not stored)."""
    per_weight, parts = split_adapter_tensors(adapter, frozenset(merged))
    if parts:
        raise AdapterError(f"cannot unmerge: the adapter also trained {sorted(parts)[:5]} (train_parts="
                           f"{list(cfg.train_parts)}), and their original values are not stored in it.")
    out = dict(merged)
    for key, tensors in per_weight.items():
        out[key] = unmerge_weight(merged[key], tensors, cfg)
    return out
