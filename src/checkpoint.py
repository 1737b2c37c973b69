"""Checkpoint tensor I/O: safe loading of `.pth` / `.safetensors` state dicts, atomic saving, and
recognising what a state dict is when it is not what we expected (RWKV-4/5/7, a Lightning or DeepSpeed
wrapper, not RWKV at all).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from src.atomic import atomic_save
from src.errors import CheckpointError

TENSOR_SUFFIXES = (".pth", ".pt", ".safetensors")


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path to the {what}.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what} file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the {what} was not written completely.")


def safe_torch_load(path: str | Path, *, what: str = "checkpoint", fix: str = "re-download or re-save it",
                    allowed_globals: Sequence[Any] = (), map_location: Any = "cpu", mmap: bool = False) -> Any:
    """THE way this project reads a torch.save file: weights_only=True (plus `allowed_globals`, plain data
    classes), so a file can never run code. Every failure is a CheckpointError naming the file and the `what`:
    missing, empty, not a torch zip archive or unreadable ("truncated or corrupt ... {fix}"), or holding other
    Python objects ("refused to load ... could run code")."""
    path = Path(path)
    _check_readable(path, what)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: cannot read this {what} (not a torch.save zip archive); it is truncated or "
                              f"corrupt: {fix}.")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = re.search(r"(Unsupported global: GLOBAL [\w.]+)", str(e))
        reason = detail.group(1) if detail else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load this {what} ({reason}). It holds Python objects other than tensors and plain "
            f"data, and loading them could run code. Only load files you trust, written by this trainer or "
            f"converted to a plain state dict or .safetensors with a trusted tool."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: cannot read this {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); it is "
            f"truncated or corrupt: {fix}."
        ) from e


def load_tensors(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a flat {name: tensor} dict from `.pth`/`.pt` (weights_only) or `.safetensors`, on CPU.
    `mmap=True` memory-maps a `.pth` file's tensors instead of reading them.

    Raises CheckpointError for a missing, empty, truncated or corrupt file, for a pickle that tries to
    build anything but tensors (which would run code), and for a file that is not a flat tensor dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        _check_readable(path, "checkpoint")
        try:
            return st_load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}). It is probably truncated or corrupt: "
                f"re-download or re-save it."
            ) from e
    obj = safe_torch_load(path, mmap=mmap)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        raise CheckpointError(
            f"{path} is a training checkpoint (it wraps a 'state_dict'), not a model file. Export the model weights "
            f"first (for our runs: the adapter .safetensors in proj_dir, or merge_bone.py)."
        )
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a flat dict of name -> tensor, got {type(obj).__name__}. "
                              f"This is not a model checkpoint.")
    return obj


def key_mismatch(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]], limit: int = 20) -> list[str]:
    """THE missing / unexpected / wrong-shape report between two {name: shape} maps, one line per kind (none
    when they match)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: got {tuple(got[k])}, expected {tuple(expected[k])}"
             for k in sorted(set(expected) & set(got)) if tuple(got[k]) != tuple(expected[k])]
    lines = []
    for label, items, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                              ("wrong shape", wrong, "; ")):
        if items:
            lines.append(f"{label} ({len(items)}): {sep.join(items[:limit])}{' ...' if len(items) > limit else ''}")
    return lines


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat tensor dict atomically; `.safetensors` (with optional string metadata) or `.pth`."""
    path = Path(path)
    if path.suffix not in TENSOR_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint extension; use one of {', '.join(TENSOR_SUFFIXES)}.")
    if metadata and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: metadata can only be stored in .safetensors files.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        atomic_save(path, lambda tmp: st_save_file(tensors, str(tmp), metadata=metadata))
    else:
        atomic_save(path, lambda tmp: torch.save(tensors, tmp))


def describe_state_dict(keys: list[str] | set[str]) -> str:
    """A one-line guess of what a state dict is, for error messages."""
    keys = set(keys)
    if not keys:
        return "it is empty"
    for wrapper in ("model.", "_forward_module.", "module."):
        if all(k.startswith(wrapper) for k in keys):
            return (f"every key starts with '{wrapper}': it is a wrapped (Lightning/DeepSpeed/DDP) state dict; "
                    f"strip the prefix or export the plain model")
    if not any(k.startswith("blocks.") for k in keys) or "emb.weight" not in keys:
        return "this is not an RWKV checkpoint (no 'emb.weight' / 'blocks.*' keys)"
    if any(k.endswith((".att.w0", ".att.a0", ".att.k_k", ".att.x_r")) for k in keys):
        return "this is an RWKV-7 (x070) checkpoint; this trainer supports RWKV-6 (x060) only"
    if any(k.endswith(".att.time_maa_x") for k in keys):
        return "this looks like an RWKV-6 (x060) checkpoint with different sizes or extra/missing tensors"
    if any(k.endswith(".att.time_faaaa") for k in keys):
        return "this is an RWKV-5 checkpoint; this trainer supports RWKV-6 (x060) only"
    if any(k.endswith(".att.time_first") for k in keys):
        return "this is an RWKV-4 checkpoint; this trainer supports RWKV-6 (x060) only"
    return "this is an RWKV checkpoint of an unknown version (not x060)"
