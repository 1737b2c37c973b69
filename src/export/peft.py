"""Adapters in peft's on-disk format (a folder with adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.<tensor>`), to and from this trainer's adapter files, for MiSS, Bone and LoRA.

Orientation, stated explicitly (W is torch's (out, in), blocks W[a, c] are b×b, a over out/b, c over in/b):

    ours                                 peft                                  tensor, update
    --peft miss --miss_r r               MISS, init_weights=True (default)     miss_block (r, out);
                                                                               ΔW[o, i] = D[i mod r, o]
    --peft bone --bone_grouping col      MISS, init_weights="bat", r = b       miss_block (out/b, b, b);
                                                                               W'[a,c] = W[a,c] + W[a,c]·B[a] + B[a]
    --peft bone --bone_grouping row      (none)                                W'[a,c] = W[a,c] + W[a,c]·B[c] + B[c]
    --peft lora                          LORA                                  lora_A.weight (r, in),
                                                                               lora_B.weight (out, r); ΔW = s·B·A
    --peft pissa                         LORA of rank 2r, original base        [A; A0], [B, −B0];
                                                                               ΔW = s·(B·A − B0·A0)

peft's "bat" mode is Bone-col: one b×b block per OUTPUT block. The old RWKV-PEFT Bone (and this trainer's default
`--bone_grouping row`) is Bone-row: one block per INPUT block, which peft cannot express, so a Bone-row adapter is
refused here (merge it with merge_bone.py instead). Reading also accepts peft's older BONE type (bone_block, the
same two modes) and the Hugging Face module names (rwkv.blocks.N.attention / feed_forward). Trained extra parts
(--train_parts) and initial states have no place in peft's format and are refused.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from src.adapters.config import PROJECTIONS, AdapterConfig
from src.adapters.files import load_adapter_file
from src.adapters.inject import save_adapter
from src.atomic import atomic_write_text
from src.checkpoint import save_tensors
from src.errors import AdapterError
from src.export.folder import atomic_folder

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _peft_config(peft_type: str, targets: list[str], **fields: object) -> dict[str, object]:
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "target_modules": targets, "exclude_modules": None, "bias": "none",
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, **fields}


def to_peft(adapter_path: str | Path, out_dir: str | Path) -> dict[str, object]:
    """Write our adapter file as a peft adapter folder (atomically). Returns the adapter_config written."""
    tensors, cfg, _ = load_adapter_file(adapter_path)
    if cfg.train_parts:
        raise AdapterError(f"{adapter_path} also trained {list(cfg.train_parts)} (--train_parts), which peft's adapter "
                           f"format cannot hold; merge it with merge_bone.py instead.")
    targets = [p for p in PROJECTIONS if p in cfg.projections()]
    out: dict[str, Tensor] = {}
    if cfg.method == "miss":
        config = _peft_config("MISS", targets, r=cfg.miss_r, mini_r=1, miss_dropout=0.0, init_weights=True)
        out = {PREFIX + k: v for k, v in tensors.items()}
    elif cfg.method == "bone" and cfg.grouping == "col":
        config = _peft_config("MISS", targets, r=cfg.b, mini_r=1, miss_dropout=0.0, init_weights="bat")
        out = {PREFIX + k.removesuffix(".bone") + ".miss_block": v for k, v in tensors.items()}
    elif cfg.method == "bone":
        raise AdapterError(f"{adapter_path} is Bone-row (--bone_grouping row: one block per input block, the old "
                           f"RWKV-PEFT Bone); peft's MiSS 'bat' mode is Bone-col (one block per output block) and "
                           f"has no row form. Merge it with merge_bone.py, or train with --bone_grouping col.")
    elif cfg.method in ("lora", "pissa"):
        r, scaling = cfg.lora_r, cfg.lora_scaling
        for key in {k.rpartition(".")[0] for k in tensors}:
            a, b = tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"]
            if cfg.method == "pissa":  # ΔW on the original base = s·(B·A − B0·A0): one LoRA of rank 2r
                a = torch.cat([a, tensors[f"{key}.pissa_A0"]], 0)
                b = torch.cat([b, -tensors[f"{key}.pissa_B0"]], 1)
            out[f"{PREFIX}{key}.lora_A.weight"], out[f"{PREFIX}{key}.lora_B.weight"] = a, b
        rank = r if cfg.method == "lora" else 2 * r
        config = _peft_config("LORA", targets, r=rank, lora_alpha=scaling * rank, lora_dropout=cfg.lora_dropout,
                              fan_in_fan_out=False, use_rslora=False, init_lora_weights=True)
    else:
        raise AdapterError(f"{adapter_path}: method {cfg.method!r} has no peft form; peft export covers miss, "
                           f"bone (col grouping), lora and pissa.")
    with atomic_folder(Path(out_dir), (CONFIG, WEIGHTS)) as tmp:
        save_tensors(tmp / WEIGHTS, {k: v.contiguous() for k, v in out.items()}, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
    return config


_HF_MODULE = re.compile(r"^(?:rwkv\.)?blocks\.(\d+)\.(attention|feed_forward|att|ffn)\.(\w+)$")


def _our_module(module: str) -> str:
    """blocks.N.att.key from peft's module path (ours or the Hugging Face names)."""
    m = _HF_MODULE.match(module)
    if not m:
        raise AdapterError(f"peft adapter module {module!r} is not an RWKV6 projection (blocks.N.att.* / ffn.*).")
    part = {"attention": "att", "feed_forward": "ffn"}.get(m.group(2), m.group(2))
    if f"{part}.{m.group(3)}" not in PROJECTIONS:
        raise AdapterError(f"peft adapter module {module!r} is not one of the projections {list(PROJECTIONS)}.")
    return f"blocks.{m.group(1)}.{part}.{m.group(3)}"


def from_peft(peft_dir: str | Path, output: str | Path, base_shapes: dict[str, tuple[int, ...]]) -> AdapterConfig:
    """Write a peft adapter folder as our adapter file for the base with these shapes (checked to fit)."""
    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / CONFIG).read_text())
        with safe_open(str(peft_dir / WEIGHTS), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as e:
        raise AdapterError(f"{peft_dir}: not a readable peft adapter folder ({CONFIG} + {WEIGHTS}): {e}") from e
    kind, init = config.get("peft_type"), config.get("init_weights", True)
    if config.get("modules_to_save"):
        raise AdapterError(f"{peft_dir}: modules_to_save={config['modules_to_save']} has no place in this trainer's "
                           f"adapters.")
    tensors: dict[str, Tensor] = {}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX).replace(".default", "")
        module, _, leaf = name.rpartition(".")
        if leaf == "weight":
            module, _, leaf = module.rpartition(".")
        ours = _our_module(module)
        if kind in ("MISS", "BONE") and leaf in ("miss_block", "bone_block"):
            tensors[f"{ours}.{'bone' if init == 'bat' else 'miss_block'}"] = t.float()
        elif kind == "LORA" and leaf in ("lora_A", "lora_B"):
            tensors[f"{ours}.{leaf}"] = t.float()
        else:
            raise AdapterError(f"{peft_dir}: tensor {key!r} is not a {kind} adapter tensor this trainer reads.")
    projections = tuple(p for p in PROJECTIONS if any(k.split(".", 2)[2].startswith(p + ".") for k in tensors))
    r = int(config.get("r", 0))
    if kind in ("MISS", "BONE") and init == "bat":
        cfg = AdapterConfig(method="bone", grouping="col", b=r, targets=projections)
    elif kind in ("MISS", "BONE") and init is True:
        cfg = AdapterConfig(method="miss", miss_r=r, targets=projections)
    elif kind == "LORA":
        alpha = float(config.get("lora_alpha", r))
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); ours by alpha/r
        cfg = AdapterConfig(method="lora", lora_r=r, lora_alpha=alpha,
                            lora_dropout=float(config.get("lora_dropout", 0.0)), targets=projections)
    else:
        raise AdapterError(f"{peft_dir}: peft_type={kind!r} init_weights={init!r} is not supported; this trainer "
                           f"reads MISS/BONE (default and 'bat' modes) and LORA adapters.")
    save_adapter(tensors, cfg, output, base_shapes=base_shapes)
    return cfg
