"""A Hugging Face folder for RWKV-org's `Rwkv6ForCausalLM` (model_type "rwkv6", the modeling code the RWKV/v6-Finch
HF repositories ship as remote code), which llama.cpp's convert_hf_to_gguf.py also converts:

    config.json                  sizes from the tensor shapes
    model.safetensors            the weights under the HF names, shapes unchanged
    rwkv_vocab_v20230424.txt     the World vocabulary (llama.cpp's converter requires it)
    tokenizer_config.json        Rwkv6Tokenizer (the remote tokenizer class of those repositories)

Names: emb. -> rwkv.embeddings., blocks.0.ln0 -> rwkv.blocks.0.pre_ln, blocks.N.att. -> rwkv.blocks.N.attention.,
blocks.N.ffn. -> rwkv.blocks.N.feed_forward., blocks.N.ln1/ln2 -> rwkv.blocks.N.ln1/ln2, ln_out -> rwkv.ln_out,
head.weight unchanged. rescale_every is 0: the weights are stored unscaled (RWKV's fp16 rescaling trick, which
the HF code and llama.cpp's converter apply when it is > 0, is not needed for an exact model). The modeling and
tokenizer .py files are not included: take them from an RWKV/v6-Finch-*-HF repository (or load the folder with
code that registers model_type rwkv6). An initial state (time_state) has no place in this layout; it is left out.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from src.adapters.export import MergedCheckpoint, write_safetensors_streaming
from src.atomic import atomic_write_text
from src.export.folder import atomic_folder
from src.export.layout import HEAD_SIZE_DIVISOR, LAYER_NORM_EPS, ModelSizes
from src.export.vocab import VOCAB_FILE, world_vocab_path

WEIGHTS = "model.safetensors"
FILES = ("config.json", WEIGHTS, VOCAB_FILE, "tokenizer_config.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_name(name: str) -> str:
    """The RWKV-org HF name of an x060 tensor name."""
    if name == "head.weight":
        return name
    if name.startswith("emb."):
        return "rwkv.embeddings." + name[len("emb."):]
    if name.startswith("ln_out."):
        return "rwkv." + name
    _, layer, rest = name.split(".", 2)
    part, _, leaf = rest.partition(".")
    part = {"ln0": "pre_ln", "att": "attention", "ffn": "feed_forward"}.get(part, part)
    return f"rwkv.blocks.{layer}.{part}.{leaf}"


def hf_config(sizes: ModelSizes, dtype: torch.dtype) -> dict[str, object]:
    return {
        "architectures": ["Rwkv6ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_rwkv6.Rwkv6Config",
                     "AutoModelForCausalLM": "modeling_rwkv6.Rwkv6ForCausalLM"},
        "model_type": "rwkv6",
        "vocab_size": sizes.vocab_size,
        "hidden_size": sizes.n_embd,
        "num_hidden_layers": sizes.n_layer,
        "attention_hidden_size": sizes.dim_att,
        "head_size": sizes.head_size,
        "head_size_divisor": HEAD_SIZE_DIVISOR,
        "intermediate_size": sizes.dim_ffn,
        "time_mix_extra_dim": sizes.d_mix,
        "time_decay_extra_dim": sizes.d_decay,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


TOKENIZER_CONFIG = {
    "tokenizer_class": "Rwkv6Tokenizer",
    "auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.Rwkv6Tokenizer", None]},
    "bos_token": "<s>", "eos_token": "<s>", "unk_token": "<s>",
    "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 40,
}


def write_hf(merged: MergedCheckpoint, sizes: ModelSizes, folder: Path) -> list[str]:
    """Write the folder atomically (a temporary folder renamed onto `folder`). Returns notes for the user."""
    names = [k for k in merged.shapes if k not in merged.states]
    dtypes = {merged.dtypes[k] for k in names if merged.dtypes[k].is_floating_point}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    vocab = world_vocab_path()
    by_hf = {hf_name(k): k for k in names}
    with atomic_folder(folder, FILES) as tmp:
        write_safetensors_streaming(tmp / WEIGHTS, {n: merged.shapes[k] for n, k in by_hf.items()},
                                    {n: merged.dtypes[k] for n, k in by_hf.items()},
                                    lambda n: merged.produce(by_hf[n]), metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(hf_config(sizes, dtype), indent=2) + "\n")
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        shutil.copyfile(vocab, tmp / VOCAB_FILE)
    notes = []
    if merged.states:
        notes.append("the trained initial state (time_state) has no place in the Hugging Face layout and was left "
                     "out; write it on its own with --state_only")
    return notes
