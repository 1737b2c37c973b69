"""Fine-tune an RWKV6 (x060) model with Bone (or LoRA / PiSSA / the ablations / full training).

    python train.py --load_model BASE.pth --data_file DATA --proj_dir out/run1 --peft bone --bone_b 64 --resume auto
    python train.py --config configs/rwkv6-1.6b-4x4090.yaml --load_model ... --data_file ...
    python train.py --n_layer 24 --n_embd 2048 --vocab_size 65536 --dry_run     # parameter table, no memory

config -> model -> adapter -> Lightning fit / resume. Everything else lives in src/.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from src.adapters.config import AdapterConfig
from src.adapters.inject import adapter_state_dict, inject_adapters, model_base_shapes, parameter_table, save_adapter
from src.checkpoint import save_tensors
from src.config import TrainConfig, load_config
from src.errors import RWKVBoneError
from src.model import RWKV6, RWKV6Config
from src.run_files import weights_file
from src.training.fingerprint import base_content_fingerprint
from src.training.preflight import gather_facts, preflight

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(cfg: TrainConfig) -> RWKV6:
    """The base model: loaded strictly from --load_model (in the --precision dtype), or initialised from
    scratch from --n_layer/--n_embd/--vocab_size (on the meta device for --dry_run)."""
    runtime = dict(wkv_backend=cfg.wkv_backend, grad_cp=bool(cfg.grad_cp))
    if cfg.load_model:
        if cfg.dry_run:
            from src.checkpoint import load_tensors

            sd = load_tensors(cfg.load_model, mmap=True)
            mcfg = RWKV6Config.from_state_dict(sd, **runtime)
            del sd
            with torch.device("meta"):
                return RWKV6(mcfg)
        # Frozen weights in the --precision dtype; full training (--peft none) keeps fp32 master weights.
        dtype = torch.float32 if cfg.peft == "none" else DTYPES[cfg.precision]
        return RWKV6.from_checkpoint(cfg.load_model, dtype=dtype, quant=cfg.quant, **runtime)  # --quant: int8/nf4 base
    mcfg = RWKV6Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, **runtime)  # type: ignore[arg-type]
    if cfg.dry_run:
        with torch.device("meta"):
            return RWKV6(mcfg)
    model = RWKV6(mcfg)
    model.init_weights(seed=cfg.seed)
    return model


def print_config(cfg: TrainConfig) -> None:
    print("config:\n" + "\n".join(f"  {k}: {v!r}" for k, v in cfg.to_dict().items()))


def run(cfg: TrainConfig) -> int:
    """Build, then fit (or only report for --dry_run). Returns the process exit code."""
    import pytorch_lightning as pl

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    print_config(cfg)
    # The machine against the configuration, before the model or the data is read: every problem at once
    report = preflight(cfg, gather_facts(os.environ, cfg.proj_dir), build=not cfg.dry_run)
    if cfg.dry_run:
        print(report.text() + ("\n" + report.estimate.table() if report.estimate else ""))
    else:
        report.raise_errors()
        for warning in report.warnings:
            print(warning.line(), file=sys.stderr)
    model = build_model(cfg)
    base_fp = "" if cfg.dry_run else base_content_fingerprint(model)
    acfg = cfg.adapter
    torch.manual_seed(cfg.seed)  # PiSSA's randomised SVD must be identical on resume
    inject_adapters(model, acfg)
    # Trainable tensors are fp32. With --strategy auto/ddp they stay fp32 and bf16/fp16 autocast runs the matmuls
    # over the frozen low-precision base. DeepSpeed casts every parameter to the precision dtype and runs without
    # autocast; its optimizer keeps the fp32 master copy, which is what the adapter file is written from.
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    print(parameter_table(model))
    if cfg.dry_run:
        return 0
    from src.training.fit import fit

    base_shapes = model_base_shapes(model)  # dense shapes (quantised too); read now: ZeRO-3 partitions parameters later
    fit(cfg, model, base_fp, export=lambda m, trained, tag: export_weights(cfg, acfg, m, trained, tag, base_shapes))
    return 0


def export_weights(cfg: TrainConfig, acfg: AdapterConfig, model: RWKV6, trained: dict[str, torch.Tensor], tag: str,
                   base_shapes: dict[str, tuple[int, ...]]) -> Path:
    """Write what the run trained from `trained` (fp32 values of the trainable parameters): the adapter file in
    fp32, or (for --peft none) a full x060 checkpoint in the --precision dtype."""
    path = weights_file(cfg.proj_dir, tag, full_model=cfg.peft == "none")
    if cfg.peft == "none":
        dtype = DTYPES[cfg.precision]  # official checkpoints are bf16; fp32 training keeps fp32
        save_tensors(path, {k: trained[k].to(dtype) for k in base_shapes})
    else:
        tensors = {k: trained.get(k, v).float() for k, v in adapter_state_dict(model, acfg).items()}
        save_adapter(tensors, acfg, path, base_shapes=base_shapes)
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        return run(cfg)
    except RWKVBoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
