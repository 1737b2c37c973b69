"""GGUF for llama.cpp, written directly with the `gguf` package's GGUFWriter in the RWKV6 layout llama.cpp loads
(architecture "rwkv6"; llama.cpp's loader is src/models/rwkv6.cpp, its own converter convert_hf_to_gguf.py's
Rwkv6Model). From the official x060 names and shapes:

| x060 tensor (torch shape) | GGUF tensor | transform |
|---|---|---|
| emb.weight (V, C) | token_embd.weight | - |
| blocks.0.ln0.weight/bias | token_embd_norm.weight/bias | - |
| blocks.N.ln1.* / ln2.* | blk.N.attn_norm.* / attn_norm_2.* | - |
| att.time_maa_x (1, 1, C) | blk.N.time_mix_lerp_x.weight | squeezed to (C) |
| att.time_maa_w/k/v/r/g (1, 1, C) each | blk.N.time_mix_lerp_fused.weight | stacked (w, k, v, r, g): (5, 1, 1, C) |
| att.time_maa_w1 (C, 5·D_mix) | blk.N.time_mix_w1.weight | transposed to (5·D_mix, C) |
| att.time_maa_w2 (5, D_mix, C) | blk.N.time_mix_w2.weight | last two dims swapped to (5, C, D_mix) |
| att.time_decay (1, 1, A) | blk.N.time_mix_decay.weight | squeezed to (A) |
| att.time_decay_w1 (C, D_decay) / w2 (D_decay, A) | blk.N.time_mix_decay_w1/w2.weight | transposed |
| att.time_faaaa (H, 64) | blk.N.time_mix_first.weight | - |
| att.receptance/key/value/gate/output.weight | blk.N.time_mix_receptance/key/value/gate/output.weight | - |
| att.ln_x.weight/bias | blk.N.time_mix_ln.weight/bias | - |
| ffn.time_maa_k/r (1, 1, C) | blk.N.channel_mix_lerp_k/r.weight | squeezed to (C) |
| ffn.key/receptance/value.weight | blk.N.channel_mix_key/receptance/value.weight | - |
| ln_out.weight/bias, head.weight | output_norm.weight/bias, output.weight | - |

Shapes above are numpy (row-major) shapes; GGUF stores them reversed (ggml's ne). Hyper-parameters come from the
shapes, including the 7B/14B extra dims (rwkv6.time_mix_extra_dim = D_mix, rwkv6.time_decay_extra_dim = D_decay),
which llama.cpp's converter guesses from hidden_size. rwkv6.rescale_every_n_layers is 0: the weights are stored
unscaled and llama.cpp keeps the residual in fp32, so nothing needs halving (llama.cpp's converter divides
output/ffn.value by 2^(layer // n) when a Hugging Face config asks for rescaling; both are the same model).

Tensor types follow llama.cpp's converter: 1-D tensors, norms, biases and the small time-mix tensors (first, w1,
w2, decay_w1, decay_w2, lerp_fused) are F32; the matrices take --dtype (fp32, fp16, bf16 or q8_0; a matrix whose
rows are not a multiple of 32 falls back from q8_0 to fp16). The vocabulary is the World one (tokenizer model
"rwkv", token 0 "<s>", padding tokens up to the embedding's rows, end-of-turn "\\n\\n" = 261, chat template
"rwkv-world"). An initial state (time_state) has no place in llama.cpp's RWKV6 and is left out.

Memory: one tensor of the model at a time, converted and written a block of rows at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from torch import Tensor

from src.adapters.export import MergedCheckpoint
from src.atomic import atomic_path
from src.errors import ConfigError
from src.export.layout import LAYER_NORM_EPS, ModelSizes
from src.export.vocab import world_tokens

ARCH = "rwkv6"
CONTEXT_LENGTH = 1048576  # RWKV has no context limit; llama.cpp's converter writes this
LERP_ORDER = ("w", "k", "v", "r", "g")
EOT_TOKEN = 261  # "\n\n", where RWKV chat turns end
ALWAYS_F32 = ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1", "time_mix_decay_w2",
              "time_mix_lerp_fused")
MATRIX_TYPES = {"fp32": GGMLQuantizationType.F32, "fp16": GGMLQuantizationType.F16,
                "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
CHUNK_BYTES = 16 << 20  # fp32 bytes converted at a time

# x060 name (after "blocks.N.") -> (GGUF name after "blk.N.", transform)
_LAYER = {
    "ln1.weight": ("attn_norm.weight", None), "ln1.bias": ("attn_norm.bias", None),
    "ln2.weight": ("attn_norm_2.weight", None), "ln2.bias": ("attn_norm_2.bias", None),
    "att.time_maa_x": ("time_mix_lerp_x.weight", "squeeze"),
    "att.time_maa_w1": ("time_mix_w1.weight", "transpose"),
    "att.time_maa_w2": ("time_mix_w2.weight", "swap_last"),
    "att.time_decay": ("time_mix_decay.weight", "squeeze"),
    "att.time_decay_w1": ("time_mix_decay_w1.weight", "transpose"),
    "att.time_decay_w2": ("time_mix_decay_w2.weight", "transpose"),
    "att.time_faaaa": ("time_mix_first.weight", None),
    "att.receptance.weight": ("time_mix_receptance.weight", None),
    "att.key.weight": ("time_mix_key.weight", None),
    "att.value.weight": ("time_mix_value.weight", None),
    "att.gate.weight": ("time_mix_gate.weight", None),
    "att.output.weight": ("time_mix_output.weight", None),
    "att.ln_x.weight": ("time_mix_ln.weight", None), "att.ln_x.bias": ("time_mix_ln.bias", None),
    "ffn.time_maa_k": ("channel_mix_lerp_k.weight", "squeeze"),
    "ffn.time_maa_r": ("channel_mix_lerp_r.weight", "squeeze"),
    "ffn.key.weight": ("channel_mix_key.weight", None),
    "ffn.receptance.weight": ("channel_mix_receptance.weight", None),
    "ffn.value.weight": ("channel_mix_value.weight", None),
}
_GLOBAL = {
    "emb.weight": "token_embd.weight", "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias", "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias", "head.weight": "output.weight",
}


def transform(t: Tensor, how: str | None) -> Tensor:
    """One of the documented layout changes (a view where possible)."""
    if how == "squeeze":
        return t.squeeze()
    if how == "transpose":
        return t.t()
    if how == "swap_last":
        return t.transpose(1, 2)
    return t


def fuse_lerps(lerps: list[Tensor]) -> Tensor:
    """time_maa_w, _k, _v, _r, _g (1, 1, C) each -> (5, 1, 1, C)."""
    return torch.stack([t.reshape(1, 1, -1) for t in lerps])


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) shape
    qtype: GGMLQuantizationType
    make: Callable[[], Tensor]


def gguf_layout(merged: MergedCheckpoint) -> list[tuple[str, list[str], str | None]]:
    """[(GGUF name, x060 source names, transform)] in the checkpoint's order; a fused lerp has five sources. The
    initial state (time_state) has no GGUF place and is not listed."""
    out = []
    for name in merged.shapes:
        if name in _GLOBAL:
            out.append((_GLOBAL[name], [name], None))
            continue
        _, layer, rest = name.split(".", 2)
        if rest.startswith("att.time_maa_") and rest[len("att.time_maa_"):] in LERP_ORDER:
            if rest == f"att.time_maa_{LERP_ORDER[0]}":
                out.append((f"blk.{layer}.time_mix_lerp_fused.weight",
                            [f"blocks.{layer}.att.time_maa_{x}" for x in LERP_ORDER], "fuse"))
            continue
        if rest == "att.time_state":
            continue
        gguf_name, how = _LAYER[rest]
        out.append((f"blk.{layer}.{gguf_name}", [name], how))
    return out


def _tensor_type(name: str, shape: tuple[int, ...], dtype: str) -> GGMLQuantizationType:
    base = name.split(".")[-2]
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or base in ALWAYS_F32:
        return GGMLQuantizationType.F32
    if dtype == "q8_0" and shape[-1] % 32:
        return GGMLQuantizationType.F16
    return MATRIX_TYPES[dtype]


def _encode(rows: Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """(n, k) rows in the GGUF encoding of qtype, as bytes (n, row bytes)."""
    rows = rows.float()
    if qtype == GGMLQuantizationType.F32:
        data = rows.contiguous().numpy()
    elif qtype == GGMLQuantizationType.F16:
        data = rows.half().numpy()
    elif qtype == GGMLQuantizationType.BF16:
        data = rows.bfloat16().view(torch.int16).numpy()
    else:
        return quants.quantize(rows.contiguous().numpy(), qtype)
    return data.view(np.uint8)


class _RowChunks:
    """A tensor that GGUFWriter.write_tensor_data writes a block of rows at a time: it only asks for `nbytes` and
    `tofile(file)`; each block is converted when written, so the encoded tensor never exists whole."""

    def __init__(self, t: Tensor, qtype: GGMLQuantizationType, nbytes: int):
        self.rows = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
        self.qtype = qtype
        self.nbytes = nbytes

    def tofile(self, f: BinaryIO) -> None:
        step = max(1, CHUNK_BYTES // (4 * self.rows.shape[1]))
        written = 0
        for start in range(0, self.rows.shape[0], step):
            block = _encode(self.rows[start:start + step], self.qtype)
            f.write(block.data if block.flags.c_contiguous else block.tobytes())
            written += block.nbytes
        if written != self.nbytes:
            raise AssertionError(f"wrote {written} bytes of a {self.nbytes}-byte tensor")


def _byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size) if shape else (size,)


def write_gguf(merged: MergedCheckpoint, sizes: ModelSizes, path: Path, dtype: str, model_name: str) -> list[str]:
    """Write the model as a llama.cpp RWKV6 GGUF at `path` (atomically), matrices in `dtype`. Returns notes for
    the user (what was left out)."""
    if sizes.dim_att != sizes.n_embd:
        raise ConfigError(f"llama.cpp's RWKV6 assumes dim_att == n_embd; this model has dim_att={sizes.dim_att}, "
                          f"n_embd={sizes.n_embd}.")
    tokens = world_tokens()
    if sizes.vocab_size < len(tokens):
        raise ConfigError(f"GGUF output carries the World vocabulary ({len(tokens)} tokens), and this model has only "
                          f"{sizes.vocab_size} embedding rows; it is not a World-vocabulary model.")
    plan: list[GGUFTensor] = []
    for gname, sources, how in gguf_layout(merged):
        if how == "fuse":
            shape: tuple[int, ...] = (len(sources), 1, 1, merged.shapes[sources[0]][-1])

            def make(sources: list[str] = sources) -> Tensor:
                return fuse_lerps([merged.produce(s) for s in sources])
        else:
            shape = tuple(transform(torch.empty(merged.shapes[sources[0]], device="meta"), how).shape)

            def make(source: str = sources[0], how: str | None = how) -> Tensor:
                return transform(merged.produce(source), how)
        plan.append(GGUFTensor(gname, shape, _tensor_type(gname, shape, dtype), make))

    ftype = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(model_name)
            writer.add_context_length(CONTEXT_LENGTH)
            writer.add_embedding_length(sizes.n_embd)
            writer.add_block_count(sizes.n_layer)
            writer.add_layer_norm_eps(LAYER_NORM_EPS)
            writer.add_rescale_every_n_layers(0)
            writer.add_wkv_head_size(sizes.head_size)
            writer.add_time_mix_extra_dim(sizes.d_mix)
            writer.add_time_decay_extra_dim(sizes.d_decay)
            writer.add_feed_forward_length(sizes.dim_ffn)
            writer.add_head_count(0)  # required by llama.cpp, unused by RWKV
            writer.add_file_type(int(ftype))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_world_vocab(writer, tokens, sizes.vocab_size)
            for t in plan:
                byte_shape = _byte_shape(t.shape, t.qtype)
                nbytes = int(np.prod(byte_shape))
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:
                data = t.make()
                if tuple(data.shape) != t.shape:
                    raise AssertionError(f"{t.name}: made {tuple(data.shape)}, declared {t.shape}")
                writer.write_tensor_data(_RowChunks(data, t.qtype, int(np.prod(_byte_shape(t.shape, t.qtype)))))
                del data
        finally:
            writer.close()
    notes = []
    if merged.states:
        notes.append("the trained initial state (time_state) has no place in llama.cpp's RWKV6 and was left out; "
                     "write it on its own with --state_only for engines that mount states")
    return notes


def _add_world_vocab(writer: gguf.GGUFWriter, tokens: list[bytes], vocab_size: int) -> None:
    # token text as llama.cpp's rwkv tokenizer reads it: the bytes literal's escaped body
    texts = [b"<s>"] + [repr(t)[2:-1].encode("utf-8") for t in tokens[1:]]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    for i in range(len(tokens), vocab_size):
        texts.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_eot_token_id(EOT_TOKEN)
    writer.add_chat_template("rwkv-world")
