"""The adapter file format: a .safetensors file of adapter tensors named "<linear prefix>.<suffix>"
(e.g. "blocks.3.att.key.bone") plus string metadata: format name and version, the AdapterConfig fields,
and the base model's shape fingerprint (sha256 of the sorted (name, shape) list) with readable sizes."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from src.adapters.config import AdapterConfig
from src.checkpoint import save_tensors
from src.errors import AdapterError, ConfigError

FORMAT = "rwkv6-adapter"
FORMAT_VERSION = 1


def base_shape_fingerprint(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short hash of a base model's sorted (tensor name, shape) list."""
    listing = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def base_summary(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Readable sizes of a base model for messages: n_layer, n_embd, vocab_size, dim_ffn."""
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    emb = shapes.get("emb.weight", ("?", "?"))
    ffn = shapes.get("blocks.0.ffn.key.weight", ("?",))
    return {"n_layer": str(max(layers) + 1 if layers else 0), "vocab_size": str(emb[0]), "n_embd": str(emb[1]),
            "dim_ffn": str(ffn[0])}


def describe_base(meta: Mapping[str, str]) -> str:
    return (f"n_layer={meta.get('n_layer', '?')}, n_embd={meta.get('n_embd', '?')}, "
            f"dim_ffn={meta.get('dim_ffn', '?')}, vocab_size={meta.get('vocab_size', '?')}")


def write_adapter_file(path: str | Path, tensors: Mapping[str, Tensor], cfg: AdapterConfig,
                       base_shapes: Mapping[str, Sequence[int]]) -> None:
    """Write tensors + metadata atomically. The caller has checked that the tensors fit cfg and the base."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: adapter files are .safetensors; use a name ending in .safetensors.")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **cfg.to_metadata(),
            "base_fingerprint": base_shape_fingerprint(base_shapes), **base_summary(base_shapes)}
    save_tensors(path, dict(tensors), metadata=meta)


def load_adapter_file(path: str | Path) -> tuple[dict[str, Tensor], AdapterConfig, dict[str, str]]:
    """Read an adapter file: (tensors on CPU, its AdapterConfig, its metadata). AdapterError when the file is
    missing, not .safetensors, corrupt, not an adapter file, from a newer format, or has bad metadata."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file. Pass the .safetensors file the trainer wrote "
                           f"(proj_dir/adapter-final.safetensors or adapter-epoch<N>.safetensors).")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: adapter files are .safetensors; a {path.suffix} file is probably a model "
                           f"checkpoint (pass it as the base model instead).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e}); it is probably truncated or corrupt. "
                           f"Use another adapter file (e.g. an earlier epoch) or re-save it.") from e
    if meta.get("format") != FORMAT:
        example = ", ".join(sorted(tensors)[:3])
        raise AdapterError(f"{path} is not an adapter file (no '{FORMAT}' metadata; tensors: {example} ...). "
                           f"If it is a model checkpoint, pass it as the base model.")
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{path}: corrupt adapter metadata (format_version={meta.get('format_version')!r}).") from e
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: adapter format version {version} is newer than this code reads "
                           f"({FORMAT_VERSION}); update the trainer.")
    try:
        cfg = AdapterConfig.from_metadata(meta)
    except (KeyError, ValueError, ConfigError) as e:
        raise AdapterError(f"{path}: corrupt adapter metadata ({type(e).__name__}: {e}); re-save the adapter.") from e
    if "base_fingerprint" not in meta:
        raise AdapterError(f"{path}: corrupt adapter metadata (no base_fingerprint); re-save the adapter.")
    not_finite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if not_finite:
        raise AdapterError(f"{path}: adapter tensors with NaN/Inf values (not finite): {', '.join(not_finite[:8])}. "
                           f"The run that wrote it diverged or the file is corrupt; use an earlier adapter-epoch file.")
    return tensors, cfg, meta


def tensor_shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}

