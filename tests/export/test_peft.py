"""Adapters in peft's format: round trips for MiSS, Bone-col (peft's "bat") and LoRA, PiSSA as a rank-2r LoRA, and
peft's own formulas (written here from peft's tuners/miss/layer.py and LoRA) applied to the exported tensors give
our merged weights; Bone-row (the old RWKV-PEFT Bone) is refused with the orientation spelled out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import peft_adapter
from src.adapters.config import AdapterConfig
from src.adapters.files import load_adapter_file
from src.adapters.inject import adapter_state_dict, save_adapter
from src.adapters.merge import merge_state_dict
from src.errors import AdapterError
from src.export.peft import from_peft, to_peft
from tests.adapters.reference import adapted_model, rel_err, tiny_base

SHAPES = {k: tuple(v.shape) for k, v in tiny_base(0, torch.float32, 2).items()}
CONFIGS = [AdapterConfig(method="miss", miss_r=32), AdapterConfig(method="bone", b=32, grouping="col"),
           AdapterConfig(method="lora", lora_r=8, lora_alpha=16, targets=("att",)),
           AdapterConfig(method="pissa", lora_r=8, lora_alpha=16)]


def peft_merged(weight: torch.Tensor, config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """W' as peft computes it from its own tensors and config."""
    w = weight.double()
    if config["peft_type"] == "LORA":
        a, b = tensors["lora_A.weight"].double(), tensors["lora_B.weight"].double()
        return w + config["lora_alpha"] / config["r"] * b @ a
    block, r = tensors["miss_block"].double(), config["r"]
    if config["init_weights"] == "bat":  # W.reshape(out/r, r, in/r, r).permute(2, 0, 1, 3) @ B + B, back
        blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // r, r).permute(2, 0, 1, 3)
        return w + (blocks @ block + block).permute(1, 2, 0, 3).reshape(w.shape)
    # default: every r-wide column chunk of W gets Dᵀ added (W.reshape(-1, in/r, r).permute(1, 2, 0) + D)
    chunks = w.reshape(-1, w.shape[1] // r, r).permute(1, 2, 0)
    return (chunks + block).permute(2, 0, 1).reshape(w.shape)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method + ("-col" if c.method == "bone" else ""))
def test_round_trip_and_peft_math(tmp_path: Path, cfg: AdapterConfig) -> None:
    adapted = adapted_model(cfg, random_seed=9)
    save_adapter(adapted, cfg, tmp_path / "ours.safetensors")
    config = to_peft(tmp_path / "ours.safetensors", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == config
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.blocks.") for k in exported)

    base = dict(tiny_base(0, torch.float32, 2))
    ours = merge_state_dict(base, adapter_state_dict(adapted, cfg), cfg)
    for key in ("blocks.0.att.key.weight", "blocks.1.att.output.weight") + (
            ("blocks.1.ffn.value.weight",) if "ffn" in cfg.targets else ()):
        module = "base_model.model." + key.removesuffix(".weight") + "."
        own = {k.removeprefix(module): v for k, v in exported.items() if k.startswith(module)}
        assert rel_err(peft_merged(base[key], config, own), ours[key].double()) < 1e-6, key

    from_peft(tmp_path / "peft", tmp_path / "back.safetensors", SHAPES)
    back, back_cfg, _ = load_adapter_file(tmp_path / "back.safetensors")
    merged_back = merge_state_dict(base, back, back_cfg)
    assert max(rel_err(merged_back[k], ours[k]) for k in ours) < 1e-6
    if cfg.method != "pissa":  # PiSSA comes back as the equivalent rank-2r LoRA
        assert (back_cfg.method, back_cfg.grouping if cfg.method == "bone" else None) == \
            (cfg.method, cfg.grouping if cfg.method == "bone" else None)
        assert back_cfg.projections() == cfg.projections()
        original = adapter_state_dict(adapted, cfg)
        assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    else:
        assert (back_cfg.method, back_cfg.lora_r) == ("lora", 16)


def test_bone_row_and_extra_parts_are_refused(tmp_path: Path) -> None:
    for cfg, message in ((AdapterConfig(b=32), "Bone-row"),
                         (AdapterConfig(method="miss", miss_r=32, train_parts=("ln",)), "train_parts")):
        save_adapter(adapted_model(cfg, random_seed=1), cfg, tmp_path / "a.safetensors")
        with pytest.raises(AdapterError, match=message):
            to_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_reads_hf_module_names_and_old_bone_type(tmp_path: Path) -> None:
    """peft adapters trained on the Hugging Face model name modules rwkv.blocks.N.attention.*; peft's BONE type
    (before it became MiSS) stores bone_block."""
    cfg = AdapterConfig(method="miss", miss_r=32, targets=("att.key",))
    adapted = adapted_model(cfg, random_seed=2)
    tensors = adapter_state_dict(adapted, cfg)
    folder = tmp_path / "hf_peft"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({f"base_model.model.rwkv.blocks.{k.split('.')[1]}.attention.key.bone_block": v.contiguous()
               for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 32, "init_weights": True}))
    assert peft_adapter.main(["--from_peft", str(folder), str(tmp_path / "a.safetensors")] +
                             ["--base_model", str(_base_file(tmp_path))]) == 0
    back, back_cfg, _ = load_adapter_file(tmp_path / "a.safetensors")
    assert back_cfg.method == "miss" and all(torch.equal(back[k], tensors[k]) for k in tensors)


def _base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.pth"
    torch.save(dict(tiny_base(0, torch.float32, 2)), path)
    return path
