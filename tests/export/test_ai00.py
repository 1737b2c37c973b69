"""Ai00 / web-rwkv .st. No Ai00 or web-rwkv runs here: the layout is checked against the table below, written down
from Ai00's converter (assets/scripts/convert_safetensors.py of Ai00-X/ai00_server: renames time_faaaa ->
time_first and time_maa -> time_mix, lower-cases, converts to fp16, swaps the last two dims of time_mix_w1/w2,
time_decay_w1/w2 and time_state, metadata {"format": "pt"})."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from src.export.ai00 import ai00_name
from src.export.convert import export_model
from tests.export.conftest import World

# x060 name -> (Ai00 name, last two dims swapped), from the converter's rules applied by hand
TABLE = {
    "emb.weight": ("emb.weight", False),
    "blocks.0.ln0.weight": ("blocks.0.ln0.weight", False),
    "blocks.0.ln1.bias": ("blocks.0.ln1.bias", False),
    "blocks.0.att.time_maa_x": ("blocks.0.att.time_mix_x", False),
    "blocks.0.att.time_maa_w": ("blocks.0.att.time_mix_w", False),
    "blocks.0.att.time_maa_g": ("blocks.0.att.time_mix_g", False),
    "blocks.0.att.time_maa_w1": ("blocks.0.att.time_mix_w1", True),
    "blocks.0.att.time_maa_w2": ("blocks.0.att.time_mix_w2", True),
    "blocks.0.att.time_decay": ("blocks.0.att.time_decay", False),
    "blocks.0.att.time_decay_w1": ("blocks.0.att.time_decay_w1", True),
    "blocks.0.att.time_decay_w2": ("blocks.0.att.time_decay_w2", True),
    "blocks.0.att.time_faaaa": ("blocks.0.att.time_first", False),
    "blocks.0.att.receptance.weight": ("blocks.0.att.receptance.weight", False),
    "blocks.0.att.gate.weight": ("blocks.0.att.gate.weight", False),
    "blocks.0.att.ln_x.weight": ("blocks.0.att.ln_x.weight", False),
    "blocks.1.att.value.weight": ("blocks.1.att.value.weight", False),
    "blocks.1.ffn.time_maa_k": ("blocks.1.ffn.time_mix_k", False),
    "blocks.1.ffn.time_maa_r": ("blocks.1.ffn.time_mix_r", False),
    "blocks.1.ffn.key.weight": ("blocks.1.ffn.key.weight", False),
    "blocks.21.att.gate.weight": ("blocks.21.att.gate.weight", False),
    "blocks.1.att.time_state": ("blocks.1.att.time_state", True),
    "ln_out.weight": ("ln_out.weight", False),
    "head.weight": ("head.weight", False),
}


def test_names_follow_the_converter() -> None:
    assert {k: ai00_name(k) for k in TABLE} == TABLE


def test_ai00_file_and_state_file(world: World, tmp_path: Path) -> None:
    out = tmp_path / "model.st"
    summary = export_model(world.base, world.adapter, out)
    assert summary.format == "ai00" and summary.dtype == "fp16"
    model = {k: v for k, v in world.merged.items() if not k.endswith("time_state")}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert len(list(f.keys())) == len(model)
        for ours, want in model.items():
            name, swap = ai00_name(ours)
            got = f.get_tensor(name)
            want = want.half().transpose(-2, -1) if swap else want.half()
            assert got.dtype == torch.float16 and torch.equal(got, want), name
    with safe_open(str(tmp_path / "model.state.st"), framework="pt") as f:
        states = {k: v for k, v in world.merged.items() if k.endswith("time_state")}
        assert set(f.keys()) == set(states) and f.metadata() == {"format": "pt"}
        for k, v in states.items():
            assert torch.equal(f.get_tensor(k), v.half().transpose(1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.st", "model.state.st"]
