"""GGUF for llama.cpp, read back with gguf's own GGUFReader: every tensor name, shape, type and value against our
merged tensors after the documented transforms (written out here independently of src/export/gguf.py), the
hyper-parameters (extra dims from the shapes) and the World vocabulary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from src.errors import ConfigError
from src.export.convert import export_model
from src.export.vocab import world_tokens
from tests.export.conftest import WORLD, World
from tests.tiny import tiny_config, tiny_state_dict

SMALL = {"time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1", "time_mix_decay_w2",
         "time_mix_lerp_fused"}


def expected_gguf(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The llama.cpp RWKV6 layout (convert_hf_to_gguf.py Rwkv6Model.modify_tensors), numpy shapes, fp32."""
    f = {k: v.float() for k, v in sd.items()}
    out = {"token_embd.weight": f["emb.weight"], "token_embd_norm.weight": f["blocks.0.ln0.weight"],
           "token_embd_norm.bias": f["blocks.0.ln0.bias"], "output_norm.weight": f["ln_out.weight"],
           "output_norm.bias": f["ln_out.bias"], "output.weight": f["head.weight"]}
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    for i in layers:
        b, g = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in (("ln1", "attn_norm"), ("ln2", "attn_norm_2"), ("att.ln_x", "time_mix_ln")):
            out[g + theirs + ".weight"], out[g + theirs + ".bias"] = f[b + ours + ".weight"], f[b + ours + ".bias"]
        for name in ("receptance", "key", "value", "gate", "output"):
            out[g + f"time_mix_{name}.weight"] = f[b + f"att.{name}.weight"]
        for name in ("key", "receptance", "value"):
            out[g + f"channel_mix_{name}.weight"] = f[b + f"ffn.{name}.weight"]
        out[g + "time_mix_lerp_x.weight"] = f[b + "att.time_maa_x"].reshape(-1)
        out[g + "time_mix_lerp_fused.weight"] = torch.stack(
            [f[b + f"att.time_maa_{x}"].reshape(1, 1, -1) for x in "wkvrg"])  # (5, 1, 1, C)
        out[g + "time_mix_w1.weight"] = f[b + "att.time_maa_w1"].t()  # (5·D, C)
        out[g + "time_mix_w2.weight"] = f[b + "att.time_maa_w2"].permute(0, 2, 1)  # (5, C, D)
        out[g + "time_mix_decay.weight"] = f[b + "att.time_decay"].reshape(-1)
        out[g + "time_mix_decay_w1.weight"] = f[b + "att.time_decay_w1"].t()
        out[g + "time_mix_decay_w2.weight"] = f[b + "att.time_decay_w2"].t()
        out[g + "time_mix_first.weight"] = f[b + "att.time_faaaa"]
        out[g + "channel_mix_lerp_k.weight"] = f[b + "ffn.time_maa_k"].reshape(-1)
        out[g + "channel_mix_lerp_r.weight"] = f[b + "ffn.time_maa_r"].reshape(-1)
    return {k: v.contiguous().numpy() for k, v in out.items()}


def field(reader: GGUFReader, key: str) -> object:
    return reader.get_field(key).contents()


MATRIX = {"fp32": GGMLQuantizationType.F32, "fp16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
          "q8_0": GGMLQuantizationType.Q8_0}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "q8_0"])
def test_gguf_reads_back_as_the_documented_layout(world: World, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "model.gguf"
    summary = export_model(world.base, world.adapter, out, dtype=dtype)
    assert summary.format == "gguf" and any("time_state" in n for n in summary.notes)
    reader = GGUFReader(out)
    expected = expected_gguf({k: v for k, v in world.merged.items() if not k.endswith("time_state")})
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)  # only the model's tensors, no adapter keys, no state
    for name, want in expected.items():
        t = tensors[name]
        assert tuple(int(d) for d in t.shape) == tuple(reversed(want.shape)), name  # GGUF stores ggml's ne order
        small = want.ndim <= 1 or name.split(".")[-2] in SMALL or not name.endswith(".weight")
        assert t.tensor_type == (GGMLQuantizationType.F32 if small else MATRIX[dtype]), name
        got = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if t.tensor_type == GGMLQuantizationType.F32:
            assert np.array_equal(got, want), name
        elif t.tensor_type == GGMLQuantizationType.F16:
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        elif t.tensor_type == GGMLQuantizationType.BF16:
            ref = torch.from_numpy(want).bfloat16().float().numpy()
            assert np.array_equal(got, ref), name
        else:  # q8_0 (one fp16 scale per 32 values): exactly gguf's own quantisation of our tensor
            assert np.array_equal(t.data, quants.quantize(want, GGMLQuantizationType.Q8_0)), name
            blocks = want.reshape(-1, 32)
            err = np.abs(got.reshape(-1, 32) - blocks).max(axis=1)
            assert (err <= np.abs(blocks).max(axis=1) / 127 * 0.6 + 1e-7).all(), name
    assert field(reader, "general.architecture") == "rwkv6"
    assert field(reader, "rwkv6.block_count") == 2 and field(reader, "rwkv6.embedding_length") == 64
    assert field(reader, "rwkv6.feed_forward_length") == 224 and field(reader, "rwkv6.wkv.head_size") == 64
    assert field(reader, "rwkv6.time_mix_extra_dim") == 32 and field(reader, "rwkv6.time_decay_extra_dim") == 64
    assert field(reader, "rwkv6.rescale_every_n_layers") == 0
    assert field(reader, "general.file_type") == {"fp32": 0, "fp16": 1, "bf16": 32, "q8_0": 7}[dtype]


def test_world_vocabulary(world: World, tmp_path: Path) -> None:
    export_model(world.base, None, tmp_path / "plain.gguf", dtype="fp32")
    reader = GGUFReader(tmp_path / "plain.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    world_vocab = world_tokens()
    assert field(reader, "tokenizer.ggml.model") == "rwkv" and len(tokens) == WORLD == len(types)
    assert tokens[0] == "<s>" and tokens[261] == "\\n\\n" and tokens[65536 - 1] == "[PAD65535]"
    assert tokens[33] == world_vocab[33].decode() and tokens[1] == "\\x00"
    assert (types[0], types[1], types[len(world_vocab)]) == (3, 1, 5)  # control, normal, unused
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eot_token_id")) == (0, 261)


def test_extra_dims_come_from_the_shapes(tmp_path: Path) -> None:
    """7B/14B use D_mix = 64 and D_decay = 128; llama.cpp's converter would guess 32/64 at this hidden size."""
    cfg = tiny_config(n_layer=1, n_embd=64, vocab_size=WORLD, d_mix=64, d_decay=128)
    torch.save(tiny_state_dict(cfg, seed=2), tmp_path / "big_dims.pth")
    export_model(tmp_path / "big_dims.pth", None, tmp_path / "m.gguf", dtype="fp32")
    reader = GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "rwkv6.time_mix_extra_dim") == 64 and field(reader, "rwkv6.time_decay_extra_dim") == 128
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.time_mix_w1.weight"] == [64, 320] and shapes["blk.0.time_mix_w2.weight"] == [64, 64, 5]
    assert shapes["blk.0.time_mix_decay_w1.weight"] == [64, 128]


def test_refusals(world: World, tmp_path: Path) -> None:
    torch.save(tiny_state_dict(tiny_config(n_layer=1, vocab_size=256), seed=1), tmp_path / "small_vocab.pth")
    with pytest.raises(ConfigError, match="World vocabulary"):
        export_model(tmp_path / "small_vocab.pth", None, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="q8_0"):
        export_model(world.base, None, tmp_path / "x.safetensors", dtype="q8_0")
    assert not list(tmp_path.glob("x.*")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
