"""Putting adapters into an RWKV6 model and getting them out: injection, the one definition of the
adapter parameters (which drives requires_grad, the optimizer, saving and merging), saving and strict
loading of adapter files on models, and parameter counting."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from src.adapters.config import PROJECTIONS, AdapterConfig
from src.adapters.files import (
    base_shape_fingerprint,
    base_summary,
    describe_base,
    load_adapter_file,
    tensor_shapes,
    write_adapter_file,
)
from src.adapters.layer import AdapterLayer
from src.adapters.methods import LAYER_TENSOR_NAMES, STATE_TENSOR_NAME, layer_class
from src.checkpoint import key_mismatch
from src.errors import AdapterError
from src.quant import QuantLinear, QuantWeight
from src.rwkv6 import RWKV6, RWKV6Config, base_state_dict

__all__ = ["inject_adapters", "adapter_parameters", "adapter_state_dict", "set_trainable",
           "save_adapter", "load_adapter_into", "check_adapter_fits", "expected_adapter_shapes",
           "parameter_table", "count_adapter_parameters", "model_base_shapes"]

_PROJECTION_MODULE = re.compile(r"^blocks\.\d+\.((?:att|ffn)\.\w+)$")


def _targeted_linears(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    wanted = set(cfg.projections())
    found = []
    for name, module in model.named_modules():
        match = _PROJECTION_MODULE.match(name)
        if match and match[1] in wanted:
            if not isinstance(module, (nn.Linear, QuantLinear)) or module.bias is not None:
                raise AdapterError(f"{name} is a {type(module).__name__}, not an nn.Linear without bias; "
                                   f"adapters go onto a plain RWKV6 model.")
            found.append((name, module))
    return found


def inject_adapters(model: nn.Module, cfg: AdapterConfig, *, initialize: bool = True) -> list[str]:
    """Replace the targeted nn.Linear projections by the method's adapter layer (reusing their weight
    Parameter), add the initial state for state tuning, then freeze everything except
    `adapter_parameters(model, cfg)`. Returns the replaced module names.

    `initialize`: the layer's training init (LoRA's Kaiming, PiSSA's SVD; skipped on the meta device); pass
    False when the adapter tensors will be loaded from a file. Bone and the state start at zero either way."""
    present = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if present:
        raise AdapterError(f"the model already has adapters ({present[0]} ...); inject into a plain base model.")
    if cfg.method == "state" or "state" in cfg.train_parts:
        if not hasattr(model, "enable_time_state"):
            raise AdapterError(f"state tuning needs an RWKV6 model, got {type(model).__name__}.")
        model.enable_time_state()  # no-op for layers whose checkpoint already holds a time_state
    linears = _targeted_linears(model, cfg)
    cls = layer_class(cfg.method)
    if cls is not None:
        cls.check_targets({name: (lin.out_features, lin.in_features) for name, lin in linears}, cfg)
        for name, linear in linears:
            layer = cls(linear.weight, cfg)
            if initialize and not layer.weight.is_meta:
                layer.initialize()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    set_trainable(model, cfg)
    return [name for name, _ in linears] if cls is not None else []


def _train_part_names(model: nn.Module, parts: Sequence[str]) -> set[str]:
    names: set[str] = set()
    if "ln" in parts:
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    if "time" in parts:
        names.update(n for n, _ in model.named_parameters() if n.rpartition(".")[2].startswith("time_"))
    if "state" in parts:
        names.update(n for n, _ in model.named_parameters() if n.endswith(".time_state"))
    return names


def adapter_parameters(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Parameter]:
    """THE trainable parameters: the adapter layers' trainable tensors plus the tensors named by
    cfg.train_parts (and the initial state for --peft state); for method "none" (full fine-tuning /
    pretraining) every parameter. Drives requires_grad, the optimizer, the adapter file and merging."""
    if cfg.method == "none":
        return dict(model.named_parameters())
    parts = _train_part_names(model, (*cfg.train_parts, "state") if cfg.method == "state" else cfg.train_parts)
    chosen = {n: p for n, p in model.named_parameters() if n in parts}
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            chosen.update({f"{module_name}.{n}": p for n, p in module.adapter_params().items()})
    return {n: p for n, p in model.named_parameters() if n in chosen}  # in the model's order


def set_trainable(model: nn.Module, cfg: AdapterConfig) -> None:
    """requires_grad = True exactly for adapter_parameters(model, cfg)."""
    trainable = {id(p) for p in adapter_parameters(model, cfg).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def adapter_state_dict(model: nn.Module, cfg: AdapterConfig) -> dict[str, Tensor]:
    """What an adapter file holds: adapter_parameters plus the layers' frozen adapter tensors (PiSSA's A0, B0)."""
    tensors: dict[str, Tensor] = {n: p.detach() for n, p in adapter_parameters(model, cfg).items()}
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            tensors.update({f"{module_name}.{n}": t.detach() for n, t in module.adapter_tensors().items()})
    return tensors


def model_base_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the model's base tensors under checkpoint names, a quantised projection weight
    (QuantWeight, src/quant) with its dense shape: the shapes adapter files fingerprint, quantised or not."""
    shapes = tensor_shapes(base_state_dict(model))
    keys = model.base_keys  # type: ignore[attr-defined]
    shapes.update({n: tuple(m.shape) for n, m in model.named_modules() if isinstance(m, QuantWeight) and n in keys})
    return shapes


def _meta_model(base_shapes: Mapping[str, Sequence[int]]) -> RWKV6:
    """An RWKV6 on the meta device whose base tensors match base_shapes strictly (CheckpointError if not)."""
    sd = {k: torch.empty(tuple(s), device="meta") for k, s in base_shapes.items()}
    with torch.device("meta"):
        model = RWKV6(RWKV6Config.from_state_dict(sd))
    model.load_base_state_dict(sd, source="the base model")
    return model


def expected_adapter_shapes(cfg: AdapterConfig, base_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The adapter file a cfg gives on a base with these tensor shapes: {name: shape}, via a meta-device model."""
    model = _meta_model(base_shapes)
    inject_adapters(model, cfg, initialize=False)
    return tensor_shapes(adapter_state_dict(model, cfg))


def _check_tensors(tensors: Mapping[str, Tensor], cfg: AdapterConfig, base_shapes: Mapping[str, Sequence[int]],
                   source: str) -> None:
    expected = expected_adapter_shapes(cfg, base_shapes)
    got = tensor_shapes(tensors)
    report = key_mismatch(expected, got, limit=8)
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not (report or not_float):
        return
    lines = [f"{source} does not fit {cfg.method} (b={cfg.b}, grouping={cfg.grouping}, r={cfg.lora_r}, "
             f"targets={','.join(cfg.targets)}, train_parts={','.join(cfg.train_parts) or 'none'}) on this base:"]
    lines += [f"  {line}" for line in report]
    if any(0 in got[k] for k in got):
        lines.append("  (empty tensors: under ZeRO-3 read the fp32 master copy, src.training.strategy.trained_tensors)")
    if not_float:
        lines.append(f"  not floating point: {', '.join(not_float[:8])}")
    lines.append("  The tensors were made with a different block size, rank, target list or model.")
    raise AdapterError("\n".join(lines))


def check_adapter_fits(tensors: Mapping[str, Tensor], cfg: AdapterConfig, meta: Mapping[str, str],
                       base_shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """AdapterError unless the adapter file (tensors, cfg, meta) was made for a base with these shapes and its
    tensors are exactly those cfg gives on it."""
    fingerprint = base_shape_fingerprint(base_shapes)
    if meta["base_fingerprint"] != fingerprint:
        raise AdapterError(f"{source} was trained on a different base model ({describe_base(meta)}; fingerprint "
                           f"{meta['base_fingerprint']}) than this one ({describe_base(base_summary(base_shapes))}; "
                           f"fingerprint {fingerprint}). Use it with the base model it was trained on.")
    _check_tensors(tensors, cfg, base_shapes, source)


def save_adapter(model_or_tensors: nn.Module | Mapping[str, Tensor], cfg: AdapterConfig, path: str | Path,
                 base_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Write the adapter file atomically (.safetensors). From a model: adapter_state_dict(model, cfg), with the
    base shapes read from the model. From a {name: tensor} dict: base_shapes (the base model's
    {name: shape}) is required. The tensors are checked to be exactly what cfg gives on that base."""
    if cfg.method == "none":
        raise AdapterError("method 'none' trains the whole model: there is nothing to save as an adapter; write a "
                           "full checkpoint instead (train.py writes model-*.safetensors for --peft none).")
    if isinstance(model_or_tensors, nn.Module):
        tensors = adapter_state_dict(model_or_tensors, cfg)
        base_shapes = model_base_shapes(model_or_tensors)
    else:
        if base_shapes is None:
            raise AdapterError("save_adapter(tensors, ...) needs base_shapes (the base model's {name: shape}) "
                               "to fingerprint the base; or pass the model itself.")
        tensors = dict(model_or_tensors)
    if not tensors:
        raise AdapterError(f"nothing to save for method {cfg.method!r} with train_parts={list(cfg.train_parts)}: "
                           f"inject adapters (or choose train_parts) first.")
    _check_tensors(tensors, cfg, base_shapes, f"the adapter tensors for {path}")
    write_adapter_file(path, tensors, cfg, base_shapes)


def load_adapter_into(model: nn.Module, path: str | Path) -> list[str]:
    """Inject the adapter described by the file into a plain base model and load its tensors strictly
    (unmerged). Returns the replaced module names. AdapterError if the file does not fit; the model is
    left untouched in that case."""
    tensors, cfg, meta = load_adapter_file(path)
    present = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if present:
        raise AdapterError(f"cannot load {path}: the model already has adapters ({present[0]} ...); "
                           f"load adapter files onto a plain base model.")
    check_adapter_fits(tensors, cfg, meta, model_base_shapes(model), str(path))
    names = inject_adapters(model, cfg, initialize=False)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                module.after_load()
    return names


def parameter_table(model: nn.Module) -> str:
    """Trainable parameters per projection, per part (att/ffn; "other" for train_parts) and in total."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix, _, suffix = name.rpartition(".")
        match = _PROJECTION_MODULE.match(prefix)
        key = match[1] if match and suffix in LAYER_TENSOR_NAMES else "state" if suffix == STATE_TENSOR_NAME \
            else "other"
        counts[key] = counts.get(key, 0) + p.numel()
    rows = []
    for part in ("att", "ffn"):
        projections = [p for p in PROJECTIONS if p.startswith(part + ".") and p in counts]
        rows += [(f"  {p}", counts[p]) for p in projections]
        if projections:
            rows.append((f"{part} total", sum(counts[p] for p in projections)))
    if "state" in counts:
        rows.append(("initial state (time_state)", counts["state"]))
    if "other" in counts:
        rows.append(("other (base tensors)", counts["other"]))
    rows.append(("total trainable", sum(counts.values())))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {n:>14,}" for label, n in rows)


def count_adapter_parameters(model_cfg: RWKV6Config, adapter_cfg: AdapterConfig) -> int:
    """Trainable parameter count of adapter_cfg on a model of model_cfg, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = RWKV6(model_cfg)
    inject_adapters(model, adapter_cfg)
    return sum(p.numel() for p in adapter_parameters(model, adapter_cfg).values())
