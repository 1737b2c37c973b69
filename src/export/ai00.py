"""Ai00 / web-rwkv `.st`: the layout Ai00's converter (assets/scripts/convert_safetensors.py of Ai00-X/ai00_server)
produces from an official checkpoint. Its rules, as that script applies them to each key:

1. rename by substring, in this order: `time_faaaa` -> `time_first`, `time_maa` -> `time_mix`; then lower-case;
2. every tensor in fp16;
3. swap the last two dims of a tensor whose renamed key contains any of `time_mix_w1`, `time_mix_w2`,
   `time_decay_w1`, `time_decay_w2`, `w1`, `w2`, `a1`, `a2`, `g1`, `g2`, `v1`, `v2`, `time_state`, `lora.0`;
4. safetensors metadata {"format": "pt"}.

This module applies the same rules (our code, checked in tests/export/test_ai00.py against a table written down
from that converter); no Ai00 or web-rwkv runs here. A trained initial state is written as the separate state
file Ai00 mounts (`<output stem>.state.st`, the converter's layout for state files: `blocks.N.att.time_state`
with its last two dims swapped, fp16), so that the model file holds only the model's tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from src.adapters.export import MergedCheckpoint, write_safetensors_streaming

RENAMES = (("time_faaaa", "time_first"), ("time_maa", "time_mix"))
TRANSPOSED = ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1", "g2",
              "v1", "v2", "time_state", "lora.0")
METADATA = {"format": "pt"}


def ai00_name(name: str) -> tuple[str, bool]:
    """(Ai00 key, whether its last two dims are swapped) of an x060 tensor name."""
    for old, new in RENAMES:
        name = name.replace(old, new)
    name = name.lower()
    return name, any(t in name for t in TRANSPOSED)


def _converted(t: torch.Tensor, swap: bool) -> torch.Tensor:
    t = t.to(torch.float16)
    return t.transpose(-2, -1) if swap and t.ndim >= 2 else t


def _write(merged: MergedCheckpoint, names: list[str], path: Path) -> None:
    mapped = {k: ai00_name(k) for k in names}
    shapes = {}
    for k, (new, swap) in mapped.items():
        shape = merged.shapes[k]
        shapes[new] = (*shape[:-2], shape[-1], shape[-2]) if swap and len(shape) >= 2 else shape
    source = {new: (k, swap) for k, (new, swap) in mapped.items()}

    def produce(new: str) -> torch.Tensor:
        k, swap = source[new]
        return _converted(merged.produce(k), swap)

    write_safetensors_streaming(path, shapes, dict.fromkeys(shapes, torch.float16), produce, metadata=METADATA)


def state_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.state.st")


def write_ai00(merged: MergedCheckpoint, path: Path) -> list[str]:
    """Write the model (and, for a state-tuned one, its state file) atomically. Returns notes for the user."""
    states = sorted(merged.states)
    _write(merged, [k for k in merged.shapes if k not in merged.states], path)
    if not states:
        return []
    _write(merged, states, state_path(path))
    return [f"the trained initial state went into {state_path(path)} (Ai00 mounts it as a state file)"]
