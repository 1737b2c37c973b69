"""Training configuration: one typed dataclass, loaded from an optional YAML file and overridden by
command-line flags (every field is a flag of the same name), then validated.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from src.errors import ConfigError
from src.run_files import is_run_output

PEFT_METHODS = ("bone", "bone_unconstrained", "bone_hadamard", "lora", "pissa", "none")
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = ("bf16", "fp16", "fp32")  # dtypes per strategy: see make_strategy and the README's table
DATA_TYPES = ("binidx", "jsonl", "sft")
LR_SCHEDULES = ("cosine", "linear", "exponential", "constant")


@dataclass
class TrainConfig:
    """Every setting of a run. Field names are the command-line flags (`--name value`)."""

    # model
    load_model: str | None = None  # official x060 .pth/.safetensors; sizes are read from it
    n_layer: int | None = None  # only without --load_model (training from scratch, --dry_run)
    n_embd: int | None = None
    vocab_size: int | None = None
    wkv_backend: str = "auto"  # auto | cuda | fla | torch
    # adapter
    peft: str = "bone"
    bone_b: int = 64
    bone_grouping: str = "row"
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    adapter_targets: list[str] = field(default_factory=lambda: ["att", "ffn"])  # parts or names like att.key
    train_parts: list[str] = field(default_factory=list)  # extra trainable base tensors, e.g. ["ln"]; default none
    # data
    data_file: str | None = None
    data_type: str = "binidx"
    val_file: str | None = None
    val_fraction: float = 0.02
    ctx_len: int = 1024
    # optimisation
    micro_bsz: int = 4
    accumulate_grad_batches: int = 1
    epoch_steps: int = 1000  # optimizer steps per epoch (window data); SFT epochs are one pass over the documents
    epoch_count: int = 1
    epoch_save: int = 1
    lr_init: float = 2e-5
    lr_final: float = 2e-5
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    skip_nonfinite: int = 0  # optimizer steps with a NaN/Inf loss or gradient to skip before stopping; 0 = stop at once
    grad_cp: int = 0
    l2wrap: int = 1
    # hardware
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16"
    # run
    seed: int = 42
    proj_dir: str = "out"
    resume: str | None = None  # auto | PATH to a training-state checkpoint
    keep_last: int = 2  # training states kept in proj_dir/checkpoints
    wandb: str | None = None  # wandb project name; WANDB_MODE=offline works without network
    log_every: int = 1
    dry_run: bool = False  # print config and parameter table, then stop

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for any invalid value; returns self."""
        choices = {"peft": PEFT_METHODS, "strategy": STRATEGIES, "precision": PRECISIONS, "data_type": DATA_TYPES,
                   "lr_schedule": LR_SCHEDULES, "bone_grouping": ("row", "col"),
                   "wkv_backend": ("auto", "cuda", "fla", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        for name in ("ctx_len", "micro_bsz", "accumulate_grad_batches", "epoch_steps", "epoch_count", "epoch_save",
                     "bone_b", "lora_r", "devices", "num_nodes", "keep_last", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("lr_init", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}.")
        if self.lr_final < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--lr_final, --warmup_steps, --weight_decay and --grad_clip must be >= 0.")
        if self.skip_nonfinite < 0:
            raise ConfigError(f"--skip_nonfinite must be >= 0, got {self.skip_nonfinite}.")
        if self.skip_nonfinite and "deepspeed" in self.strategy:
            raise ConfigError("--skip_nonfinite works with --strategy auto/ddp only; DeepSpeed keeps its own gradients.")
        if self.lr_schedule == "exponential" and self.lr_final <= 0:
            raise ConfigError("--lr_schedule exponential needs --lr_final > 0.")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val_fraction must be in [0, 1), got {self.val_fraction}.")
        sizes = (self.n_layer, self.n_embd, self.vocab_size)
        if self.load_model and any(s is not None for s in sizes):
            raise ConfigError("sizes come from the checkpoint: drop --n_layer/--n_embd/--vocab_size when --load_model is given.")
        if not self.load_model and not all(s is not None for s in sizes):
            raise ConfigError("give --load_model (an official x060 checkpoint), or all of --n_layer --n_embd --vocab_size "
                              "to build a model from scratch.")
        if not self.load_model and self.peft != "none" and not self.dry_run:
            raise ConfigError(f"--peft {self.peft} fine-tunes a base model: give --load_model, or use --peft none to "
                              f"train a model from scratch.")
        if not self.dry_run and not self.data_file:
            raise ConfigError("--data_file is required (a binidx prefix or a .jsonl file).")
        proj = Path(self.proj_dir)
        if proj.exists() and not proj.is_dir():
            raise ConfigError(f"--proj_dir {proj} is an existing file, not a folder; give a folder for the run's outputs.")
        for name in ("load_model", "data_file", "val_file"):
            value = getattr(self, name)
            if value and is_run_output(Path(value), proj):
                raise ConfigError(f"--{name} {value} is a file this run writes into --proj_dir {proj}, so the run would "
                                  f"overwrite its own input. Copy it elsewhere or use another --proj_dir.")
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint. Use --resume auto to pick the newest in proj_dir.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_fingerprint(self) -> str:
        """Hash of the settings a resumed run must share with the run it resumes (adapter and data shape)."""
        keys = ("peft", "bone_b", "bone_grouping", "lora_r", "lora_alpha", "adapter_targets", "train_parts", "ctx_len")
        payload = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {text!r}")


def _flag_type(tp: Any) -> tuple[Any, str | None]:
    """(argparse type, nargs) for a dataclass field type."""
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    if origin is list:
        return str, "*"
    if args:  # Optional[X]
        return _flag_type(args[0])
    if tp is bool:
        return _parse_bool, None
    return tp, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune an RWKV6 (x060) model with Bone (or LoRA/PiSSA/full), via PyTorch Lightning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of settings; flags override its values")
    hints = get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        ftype, nargs = _flag_type(hints[f.name])
        parser.add_argument(f"--{f.name}", type=ftype, nargs=nargs, default=None,
                            help=f"(default: {getattr(defaults, f.name)!r})")
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML (--config) <- flags; validated."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of setting: value.")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {', '.join(unknown)}. Run `python train.py --help` for the list.")
        values.update(loaded)
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"bad configuration: {e}") from e
    return cfg.validate()
