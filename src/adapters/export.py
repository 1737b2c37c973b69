"""Merging an adapter file into a base checkpoint file (or unmerging it, or only converting), streaming tensor by
tensor: `open_merged` describes the result (names, shapes, dtypes, and a producer of one tensor at a time) and
the writers here (.pth, .safetensors) and in src/export (GGUF, Hugging Face folder, Ai00 .st) consume it.

The base is memory-mapped (each .safetensors tensor copy-on-write via numpy, or `torch.load(mmap=True,
weights_only=True)`): unchanged tensors are never copied into memory, and one merged tensor at a time is.
A `.safetensors` output is written incrementally (header from the known shapes, then each tensor's bytes).
A `.pth` output needs one `torch.save` of the whole dict: each computed tensor (merged or cast) is spilled to a
temporary file next to the output and memory-mapped back, so the dict holds only file-backed tensors. Every
output is written atomically and holds base keys only.
"""
from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from src.adapters.config import AdapterConfig
from src.adapters.files import load_adapter_file
from src.adapters.inject import check_adapter_fits
from src.adapters.merge import ADDED_SUFFIX, merge_weight, split_adapter_tensors, unmerge_weight
from src.atomic import atomic_path, atomic_save
from src.checkpoint import load_tensors, save_tensors
from src.errors import AdapterError, CheckpointError, ConfigError
from src.quant import check_quant, quantize_dequantize

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class LazyCheckpoint:
    """A checkpoint's tensor names, shapes and dtypes, and a loader for one tensor at a time."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    load: Callable[[str], Tensor]


def open_checkpoint_lazily(path: Path) -> LazyCheckpoint:
    """Open a .safetensors or .pth/.pt checkpoint without reading its tensors. CheckpointError when the file
    is missing, corrupt, unsafe or not a flat tensor dict."""
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"{path}: no such checkpoint file (or it is empty). Pass the base model's .pth or "
                              f".safetensors file.")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu"):  # validates the header and the file size
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-save "
                                  f"it.") from e
        return _map_safetensors(path)
    sd = load_tensors(path, mmap=True)
    return LazyCheckpoint(shapes={k: tuple(v.shape) for k, v in sd.items()},
                          dtypes={k: v.dtype for k, v in sd.items()}, load=sd.__getitem__)


def _map_safetensors(path: Path) -> LazyCheckpoint:
    """Memory-map each tensor of a (validated) .safetensors file copy-on-write: file-backed, nothing read yet."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    unknown = sorted({info["dtype"] for info in header.values()} - set(_FROM_SAFETENSORS))
    if unknown:
        raise CheckpointError(f"{path}: tensor dtypes {unknown} are not supported; convert the checkpoint to "
                              f"bf16/fp16/fp32.")
    shapes = {k: tuple(info["shape"]) for k, info in header.items()}
    dtypes = {k: _FROM_SAFETENSORS[info["dtype"]] for k, info in header.items()}

    def load(name: str) -> Tensor:
        begin, end = header[name]["data_offsets"]
        if begin == end:
            return torch.empty(shapes[name], dtype=dtypes[name])
        data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len + begin, shape=(end - begin,))
        return torch.from_numpy(data).view(dtypes[name]).view(shapes[name])

    return LazyCheckpoint(shapes=shapes, dtypes=dtypes, load=load)


def write_safetensors_streaming(path: Path, shapes: Mapping[str, tuple[int, ...]],
                                dtypes: Mapping[str, torch.dtype], produce: Callable[[str], Tensor],
                                metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file atomically, tensor by tensor: the header comes from the known shapes and dtypes,
    then each tensor's bytes as `produce(name)` returns them (one tensor in memory at a time)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtypes[name]).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtypes[name]], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in shapes:
            t = produce(name)
            if t.dtype != dtypes[name] or tuple(t.shape) != tuple(shapes[name]):
                raise AssertionError(f"{name}: produced {t.dtype} {tuple(t.shape)}, declared {dtypes[name]} "
                                     f"{tuple(shapes[name])}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t  # before the next tensor is produced: one tensor in memory at a time


def _write_pth_spilled(path: Path, names: list[str], produce: Callable[[str], Tensor], computed: set[str]) -> None:
    """torch.save a dict whose computed tensors (merged or cast) are spilled to temporary files and memory-mapped
    back. All computing happens first, so no long-lived allocation sits between the merge temporaries (which
    would keep the allocator from returning their memory)."""
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as spill:
        spilled: dict[str, tuple[Path, torch.Size, torch.dtype]] = {}
        for i, name in enumerate(n for n in names if n in computed):
            t = produce(name)
            spilled[name] = (Path(spill) / f"{i}.bin", t.shape, t.dtype)
            with open(spilled[name][0], "wb") as f:
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        out: dict[str, Tensor] = {}
        for name in names:
            if name in spilled and spilled[name][1].numel() > 0:
                file, shape, dtype = spilled[name]
                out[name] = torch.from_file(str(file), shared=False, size=shape.numel(), dtype=dtype).view(shape)
            else:
                out[name] = produce(name)
        atomic_save(path, lambda tmp: torch.save(out, tmp))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (also through links and `.` components)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


@dataclass(frozen=True)
class MergedCheckpoint:
    """What a merge (or plain conversion) writes, one tensor at a time: the base's tensor names in the base's order
    (a trained initial state the base lacks after them), their shapes and dtypes, and `produce(name)`, which
    returns the tensor (memory-mapped from the base when unchanged, freshly computed when in `computed`).
    `cfg` is the adapter's configuration (None without an adapter), `changed` the names whose values the adapter
    changed, added or (unmerging) removed, and `added` the initial-state tensors the adapter brings."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    produce: Callable[[str], Tensor]
    computed: frozenset[str]
    cfg: AdapterConfig | None
    changed: list[str]

    @property
    def states(self) -> frozenset[str]:
        """The trained initial states (`blocks.N.att.time_state`) among the tensors."""
        return frozenset(k for k in self.shapes if k.endswith(f".{ADDED_SUFFIX}"))

    def cast(self, dtype: torch.dtype | None, keep: frozenset[str] = frozenset()) -> MergedCheckpoint:
        """The same tensors with every floating-point one (except the names in `keep`) in `dtype`; None keeps
        the stored dtypes."""
        if dtype is None:
            return self
        moved = {k for k, d in self.dtypes.items() if d.is_floating_point and d != dtype and k not in keep}
        if not moved:
            return self
        produce = self.produce

        def cast_one(name: str) -> Tensor:
            t = produce(name)
            return t.to(dtype) if name in moved else t

        return replace(self, dtypes={k: dtype if k in moved else d for k, d in self.dtypes.items()},
                       produce=cast_one, computed=self.computed | moved)


def open_merged(base_path: str | Path, adapter_path: str | Path | None = None, *,
                unmerge: bool = False, quant: str | None = None) -> MergedCheckpoint:
    """Describe base + adapter (or, with unmerge, the base recovered from a checkpoint the adapter was merged
    into; without an adapter, the base itself) without computing anything yet. A trained initial state goes in
    as `blocks.N.att.time_state` (fp32, the layout the `rwkv` package reads).

    `quant` ("int8"/"nf4"): merge onto the dequantised base deq(Q(W)), the weights an adapter trained with
    --quant saw (src.quant.quantize_dequantize), instead of the original full-precision W (the default). It must
    be the quantisation the adapter file records (ConfigError otherwise).

    Raises AdapterError for an adapter that does not fit the base, CheckpointError for an unreadable base."""
    quant = check_quant(quant)
    if quant is not None and (unmerge or adapter_path is None):
        raise ConfigError("--quant merges an adapter onto the dequantised base: it needs --bone and no --unmerge.")
    base = open_checkpoint_lazily(Path(base_path))
    if adapter_path is None:
        if unmerge:
            raise ConfigError("--unmerge needs the adapter (--bone) that was merged into the checkpoint.")
        return MergedCheckpoint(shapes=dict(base.shapes), dtypes=dict(base.dtypes), produce=base.load,
                                computed=frozenset(), cfg=None, changed=[])
    adapter, cfg, meta = load_adapter_file(adapter_path)
    check_adapter_fits(adapter, cfg, meta, base.shapes, str(adapter_path))
    if quant is not None and cfg.quant != quant:
        fix = "drop --quant" if cfg.quant == "none" else f"use --quant {cfg.quant}"
        raise ConfigError(f"{adapter_path} was trained on a base quantised as {cfg.quant!r}, not {quant!r}: --quant "
                          f"{quant} would merge it onto weights it never saw. Fix: {fix}.")
    states = {k for k in adapter if k.endswith(f".{ADDED_SUFFIX}")}
    removed: set[str] = set()
    shapes = dict(base.shapes)
    if unmerge:
        removed = states & set(base.shapes)  # merging added them; unmerging takes them out again
        adapter = {k: v for k, v in adapter.items() if k not in removed}
        shapes = {k: s for k, s in base.shapes.items() if k not in removed}
    split = split_adapter_tensors(adapter, frozenset(base.shapes))
    if unmerge and split.parts:
        raise AdapterError(f"cannot unmerge {adapter_path}: it also trained {sorted(split.parts)[:3]} ... "
                           f"(train_parts={list(cfg.train_parts)}), whose original values it does not store.")
    transform = unmerge_weight if unmerge else merge_weight
    shapes.update({k: tuple(v.shape) for k, v in split.added.items()})
    dtypes = {k: base.dtypes[k] for k in shapes if k in base.dtypes}
    dtypes.update({k: torch.float32 for k in split.added})

    def produce(name: str) -> Tensor:
        if name in split.added:
            return split.added[name].float()
        t = base.load(name)
        if name in split.per_weight:
            return transform(quantize_dequantize(t, quant), split.per_weight[name], cfg)
        if name in split.parts:
            return split.parts[name].to(t.dtype)
        return t

    computed = frozenset(split.per_weight) | frozenset(split.parts) | frozenset(split.added)
    return MergedCheckpoint(shapes=shapes, dtypes=dtypes, produce=produce, computed=computed, cfg=cfg,
                            changed=[k for k in shapes if k in computed] + sorted(removed))


def write_checkpoint(merged: MergedCheckpoint, output_path: Path) -> None:
    """Write a merged checkpoint as .safetensors (streamed) or .pth (computed tensors spilled), atomically."""
    if output_path.suffix == ".safetensors":
        write_safetensors_streaming(output_path, merged.shapes, merged.dtypes, merged.produce)
    else:
        _write_pth_spilled(output_path, list(merged.shapes), merged.produce, set(merged.computed))


@dataclass(frozen=True)
class MergeSummary:
    cfg: AdapterConfig | None
    changed: list[str]  # base tensor names whose values changed (or that were added or removed)
    output: Path


def check_output_path(output_path: Path, inputs: Mapping[str, Path | None]) -> None:
    """ConfigError when the output is one of the inputs ({flag: path})."""
    for label, other in inputs.items():
        if other is not None and same_file(output_path, other):
            raise ConfigError(f"output {output_path} is the same file as the {label} input; write to a new path.")


def write_state_only(adapter_path: Path, output_path: Path) -> MergeSummary:
    """Write only the trained initial state of a state-tuned adapter (fp32 `blocks.N.att.time_state`), for
    engines that mount states separately."""
    adapter, cfg, _ = load_adapter_file(adapter_path)
    states = {k: v for k, v in adapter.items() if k.endswith(f".{ADDED_SUFFIX}")}
    if not states:
        raise ConfigError(f"--state_only writes the trained initial state, and {adapter_path} holds none (train "
                          f"with --peft state or --train_parts state).")
    save_tensors(output_path, {k: v.float() for k, v in states.items()})
    return MergeSummary(cfg=cfg, changed=sorted(states), output=output_path)


def merge_checkpoint_file(base_path: str | Path, adapter_path: str | Path, output_path: str | Path, *,
                          unmerge: bool = False, state_only: bool = False, dtype: torch.dtype | None = None,
                          quant: str | None = None) -> MergeSummary:
    """Write base + adapter (or, with unmerge, the base recovered from a merged checkpoint) to output_path
    (.safetensors or .pth by extension), a standard x060 checkpoint without adapter keys, its tensors in `dtype`
    (None: the base's dtypes; a trained initial state stays fp32, the layout the `rwkv` package reads).
    `state_only` writes a file holding only the trained initial state, for engines that mount states separately.
    `quant`: merge onto the dequantised base the adapter was trained against (see `open_merged`).

    Raises ConfigError for an output path equal to an input or with an unknown extension, AdapterError for an
    adapter that does not fit the base, CheckpointError for an unreadable base."""
    base_path, adapter_path, output_path = Path(base_path), Path(adapter_path), Path(output_path)
    check_output_path(output_path, {"--base_model": base_path, "--bone (adapter)": adapter_path})
    if output_path.suffix not in (".safetensors", ".pth"):
        raise ConfigError(f"output {output_path}: use a .pth or .safetensors file name.")
    if state_only:
        if unmerge or quant is not None:
            raise ConfigError("--state_only writes the trained initial state; it cannot be combined with --unmerge "
                              "or --quant.")
        return write_state_only(adapter_path, output_path)
    merged = open_merged(base_path, adapter_path, unmerge=unmerge, quant=quant)
    write_checkpoint(merged.cast(dtype, keep=merged.states), output_path)
    return MergeSummary(cfg=merged.cfg, changed=merged.changed, output=output_path)
