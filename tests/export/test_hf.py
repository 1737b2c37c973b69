"""The Hugging Face folder (RWKV-org Rwkv6ForCausalLM): its files, config.json from the shapes, the key names
(written out here from REFERENCE §7), values, and the folder written as a whole (replaced only when it is an
earlier export)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from src.errors import ConfigError
from src.export.convert import export_model
from src.export.vocab import world_vocab_path
from tests.export.conftest import WORLD, World

HF_NAMES = {  # x060 name -> RWKV-org HF name
    "emb.weight": "rwkv.embeddings.weight",
    "blocks.0.ln0.weight": "rwkv.blocks.0.pre_ln.weight", "blocks.0.ln0.bias": "rwkv.blocks.0.pre_ln.bias",
    "blocks.1.ln1.weight": "rwkv.blocks.1.ln1.weight", "blocks.1.ln2.bias": "rwkv.blocks.1.ln2.bias",
    "blocks.1.att.time_maa_x": "rwkv.blocks.1.attention.time_maa_x",
    "blocks.0.att.time_maa_w1": "rwkv.blocks.0.attention.time_maa_w1",
    "blocks.0.att.time_faaaa": "rwkv.blocks.0.attention.time_faaaa",
    "blocks.0.att.key.weight": "rwkv.blocks.0.attention.key.weight",
    "blocks.0.att.ln_x.bias": "rwkv.blocks.0.attention.ln_x.bias",
    "blocks.1.ffn.time_maa_r": "rwkv.blocks.1.feed_forward.time_maa_r",
    "blocks.1.ffn.value.weight": "rwkv.blocks.1.feed_forward.value.weight",
    "ln_out.weight": "rwkv.ln_out.weight", "ln_out.bias": "rwkv.ln_out.bias",
    "head.weight": "head.weight",
}


def test_hf_folder(world: World, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    summary = export_model(world.base, world.adapter, out)
    assert summary.format == "hf" and any("time_state" in n for n in summary.notes)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "rwkv_vocab_v20230424.txt", "tokenizer_config.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Rwkv6ForCausalLM"] and config["model_type"] == "rwkv6"
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size",
                                   "head_size", "head_size_divisor", "intermediate_size", "layer_norm_epsilon",
                                   "rescale_every", "tie_word_embeddings", "bos_token_id", "eos_token_id")} == {
        "vocab_size": WORLD, "hidden_size": 64, "num_hidden_layers": 2, "attention_hidden_size": 64, "head_size": 64,
        "head_size_divisor": 8, "intermediate_size": 224, "layer_norm_epsilon": 1e-5, "rescale_every": 0,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
    assert (out / "rwkv_vocab_v20230424.txt").read_bytes() == world_vocab_path().read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        model = {k: v for k, v in world.merged.items() if not k.endswith("time_state")}
        assert len(keys) == len(model) and not [k for k in keys if "bone" in k or "state" in k]
        for ours, theirs in HF_NAMES.items():
            assert theirs in keys, theirs
            assert torch.equal(f.get_tensor(theirs), model[ours]), theirs
        assert all(k.startswith(("rwkv.", "head.")) for k in keys)


def test_hf_folder_is_replaced_whole_and_never_a_users_folder(world: World, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export_model(world.base, None, out, dtype="bf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("head.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_model(world.base, world.adapter, out)  # an earlier export is replaced
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("rwkv.blocks.0.attention.key.weight"), world.merged["blocks.0.att.key.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or old folders left
    mine = tmp_path / "my_stuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        export_model(world.base, None, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    inside = out / "base.pth"
    inside.write_bytes(world.base.read_bytes())
    with pytest.raises(ConfigError, match="inside the output folder"):
        export_model(inside, None, out)
