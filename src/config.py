"""Training configuration: one typed dataclass whose fields are the command-line flags, loaded from an optional
YAML file and overridden by flags, then validated. Each field's help text is its `--help` line.

Owners: the choice lists come from the rooms that own them (adapter methods and groupings from src/adapters,
WKV backends from src/wkv.py, data types from src/data); this module owns strategies, precisions and LR
schedules, parses the strategy once (`StrategySpec`) and builds the AdapterConfig (`TrainConfig.adapter`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from src.adapters.config import METHODS, PARTS, QUANT_CHOICES, TRAIN_PARTS, AdapterConfig
from src.data.dataset import DATA_TYPES, DEFAULT_ROLE_MARKERS
from src.data.roles import RoleMarkers
from src.errors import ConfigError
from src.run_files import is_run_output
from src.wkv import BACKENDS

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = ("bf16", "fp16", "fp32")  # what runs in which dtype per strategy: src/training/strategy.py, README
LR_SCHEDULES = ("cosine", "linear", "exponential", "constant")
# Settings that describe the adapter (and data shape) a resumed run must share with the run it resumes.
ADAPTER_SETTINGS = ("peft", "bone_b", "bone_grouping", "lora_r", "lora_alpha", "adapter_targets", "train_parts",
                    "ctx_len", "quant", "miss_r")


@dataclass(frozen=True)
class StrategySpec:
    """--strategy, parsed once: `name` as given; `deepspeed`, its ZeRO `stage` (0 without DeepSpeed) and
    whether optimizer states (and ZeRO-3 parameters) are offloaded to the CPU."""

    name: str
    deepspeed: bool
    stage: int
    offload: bool

    @staticmethod
    def parse(name: str) -> StrategySpec:
        if name not in STRATEGIES:
            raise ConfigError(f"--strategy {name!r} is not one of {', '.join(STRATEGIES)}.")
        if not name.startswith("deepspeed_stage_"):
            return StrategySpec(name, False, 0, False)
        return StrategySpec(name, True, int(name.split("_")[2]), name.endswith("_offload"))


def _opt(default: Any, help: str) -> Any:
    """A field with its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run. Field names are the command-line flags (`--name value`) and the YAML keys."""

    # model
    load_model: str | None = _opt(None, "official x060 checkpoint (.pth/.safetensors); sizes are read from it")
    n_layer: int | None = _opt(None, "layers, only without --load_model (training from scratch, --dry_run)")
    n_embd: int | None = _opt(None, "embedding size, only without --load_model")
    vocab_size: int | None = _opt(None, "vocabulary size, only without --load_model (65536 for World)")
    quant: str = _opt("none", f"frozen base projections held as {' | '.join(QUANT_CHOICES)} (bitsandbytes; src/quant)")
    wkv_backend: str = _opt("auto", f"WKV6 kernel: {' | '.join(BACKENDS)} (auto = cuda > fla > torch)")
    # adapter
    peft: str = _opt("bone", f"method: {' | '.join(METHODS)} (none = full training)")
    bone_b: int = _opt(64, "Bone block size b")
    bone_grouping: str = _opt("row", "Bone grouping: row (one bone per input block) | col (per output block)")
    lora_r: int = _opt(32, "LoRA/PiSSA rank")
    lora_alpha: float = _opt(32.0, "LoRA/PiSSA alpha (scaling = alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    miss_r: int = _opt(64, "MiSS rank r (--peft miss: one (r, out) shard shared across the input)")
    adapter_targets: list[str] = _opt(list(PARTS), f"parts {' '.join(PARTS)} or projections like att.key")
    train_parts: list[str] = _opt([], f"extra trainable base tensors: {' '.join(TRAIN_PARTS)} (default none)")
    # data
    data_file: str | None = _opt(None, "training data: a binidx prefix or a .jsonl file")
    data_type: str = _opt("binidx", f"{' | '.join(DATA_TYPES)}")
    val_file: str | None = _opt(None, "validation data (same type); else --val_fraction of the data is held out")
    val_fraction: float = _opt(0.02, "fraction held out for validation when no --val_file")
    role_markers: list[str] = _opt(list(DEFAULT_ROLE_MARKERS), "sft: role names of 'Name:' turn markers in text "
                                   "and binidx data; the loss covers assistant turns (src/data/roles.py)")
    skip_bad_records: bool = _opt(False, "leave bad data records out, counted and reported by reason, "
                                         "instead of stopping at the first")
    ctx_len: int = _opt(1024, "tokens per sample")
    chunk_ctx: int = _opt(0, "train each sample in chunks of N tokens with the recurrent state carried (and "
                             "backpropagated) across chunks: activation memory grows with N, not ctx_len; 0 = off")
    head_chunk: int = _opt(0, "compute the head and the loss N tokens at a time (recomputed in backward), so the "
                              "(B, T, vocab) logits never exist at once; same loss; 0 = off")
    # optimisation
    micro_bsz: int = _opt(4, "samples per GPU per micro-batch")
    accumulate_grad_batches: int = _opt(1, "micro-batches per optimizer step")
    epoch_steps: int = _opt(1000, "optimizer steps per epoch (window data); SFT epochs are one pass over the data")
    epoch_count: int = _opt(1, "epochs")
    epoch_save: int = _opt(1, "write the adapter every N epochs (and at the end)")
    lr_init: float = _opt(2e-5, "learning rate after warmup")
    lr_final: float = _opt(2e-5, "learning rate at the end")
    lr_schedule: str = _opt("cosine", f"decay after warmup: {' | '.join(LR_SCHEDULES)}")
    warmup_steps: int = _opt(0, "linear warmup from 1%% of lr_init over this many optimizer steps")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.0, "AdamW weight decay (2-D tensors and adapters; never time_* or norms)")
    grad_clip: float = _opt(1.0, "gradient-norm clip; 0 = off")
    skip_nonfinite: int = _opt(0, "optimizer steps with a NaN/Inf loss or gradient to skip before stopping")
    grad_cp: int = _opt(0, "gradient checkpointing per block (1 = on): less memory, ~30%% more compute")
    l2wrap: int = _opt(1, "the official L2Wrap logit regulariser (1 = on)")
    # hardware
    accelerator: str = _opt("auto", "Lightning accelerator: auto | cpu | gpu")
    devices: int = _opt(1, "GPUs (or CPU processes) per node")
    num_nodes: int = _opt(1, "nodes")
    strategy: str = _opt("auto", f"{' | '.join(STRATEGIES)}")
    precision: str = _opt("bf16", f"{' | '.join(PRECISIONS)}")
    # run
    seed: int = _opt(42, "seed of the data order, adapter init and dropout")
    proj_dir: str = _opt("out", "folder for adapters, training states, metrics and loss.png")
    resume: str | None = _opt(None, "auto (newest state in proj_dir, or a fresh start) | PATH to a training state")
    keep_last: int = _opt(2, "training states kept in proj_dir/checkpoints")
    save_every_steps: int = _opt(0, "also write a training state every N optimizer steps inside an epoch; 0 = off")
    save_every_minutes: float = _opt(0.0, "also write a training state inside an epoch once N minutes have passed "
                                          "since the last one; 0 = off")
    wandb: str | None = _opt(None, "Weights & Biases project (WANDB_MODE=offline works without network)")
    log_every: int = _opt(1, "write metrics every N optimizer steps")
    sample_prompts: str | None = _opt(None, "file of prompts (.jsonl {\"prompt\": ...} or .txt, one per line, \\n "
                                            "for newlines) continued at every validation into metrics.jsonl / W&B")
    sample_tokens: int = _opt(64, "tokens generated per sample prompt")
    dry_run: bool = _opt(False, "print the configuration and the trainable-parameter table, then stop")

    def validate(self) -> TrainConfig:
        """Raise ConfigError for any invalid value; returns self."""
        choices = {"data_type": DATA_TYPES, "precision": PRECISIONS, "lr_schedule": LR_SCHEDULES,
                   "wkv_backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        spec = StrategySpec.parse(self.strategy)
        RoleMarkers.parse(self.role_markers)  # a malformed --role_markers fails here, not after loading the model
        self.adapter  # noqa: B018 - validates --peft, --bone_b, --bone_grouping, --lora_*, targets and parts
        for name in ("ctx_len", "micro_bsz", "accumulate_grad_batches", "epoch_steps", "epoch_count", "epoch_save",
                     "devices", "num_nodes", "keep_last", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.sample_prompts and not Path(self.sample_prompts).is_file():
            raise ConfigError(f"--sample_prompts {self.sample_prompts}: no such file.")
        if self.sample_tokens <= 0:
            raise ConfigError(f"--sample_tokens must be a positive integer, got {self.sample_tokens}.")
        if self.save_every_steps < 0 or self.save_every_minutes < 0:
            raise ConfigError("--save_every_steps and --save_every_minutes must be >= 0 (0 = off).")
        if self.chunk_ctx < 0 or self.head_chunk < 0:
            raise ConfigError(f"--chunk_ctx and --head_chunk must be >= 0 (0 = off), got {self.chunk_ctx}, "
                              f"{self.head_chunk}.")
        for name in ("lr_init", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}.")
        if self.lr_final < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--lr_final, --warmup_steps, --weight_decay and --grad_clip must be >= 0.")
        if self.skip_nonfinite < 0:
            raise ConfigError(f"--skip_nonfinite must be >= 0, got {self.skip_nonfinite}.")
        if self.skip_nonfinite and spec.deepspeed:
            raise ConfigError("--skip_nonfinite works with --strategy auto/ddp only; "
                              "DeepSpeed keeps its own gradients.")
        if self.lr_schedule == "exponential" and self.lr_final <= 0:
            raise ConfigError("--lr_schedule exponential needs --lr_final > 0.")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val_fraction must be in [0, 1), got {self.val_fraction}.")
        sizes = (self.n_layer, self.n_embd, self.vocab_size)
        if self.load_model and any(s is not None for s in sizes):
            raise ConfigError("sizes come from the checkpoint: drop --n_layer/--n_embd/--vocab_size when --load_model "
                              "is given.")
        if not self.load_model and not all(s is not None for s in sizes):
            raise ConfigError("give --load_model (an official x060 checkpoint), or all of --n_layer --n_embd "
                              "--vocab_size to build a model from scratch.")
        if not self.load_model and self.peft != "none" and not self.dry_run:
            raise ConfigError(f"--peft {self.peft} fine-tunes a base model: give --load_model, or use --peft none to "
                              f"train a model from scratch.")
        if self.quant != "none" and self.peft == "none":
            raise ConfigError(f"--quant {self.quant} freezes the base in {self.quant}: it needs an adapter method "
                              f"(--peft bone, lora, ...); full training (--peft none) needs a dense base "
                              f"(--quant none).")
        if not self.dry_run and not self.data_file:
            raise ConfigError("--data_file is required (a binidx prefix or a .jsonl file).")
        proj = Path(self.proj_dir)
        if proj.exists() and not proj.is_dir():
            raise ConfigError(f"--proj_dir {proj} is an existing file, not a folder; "
                              f"give a folder for the run's outputs.")
        for name in ("load_model", "data_file", "val_file"):
            value = getattr(self, name)
            if value and is_run_output(Path(value), proj):
                raise ConfigError(f"--{name} {value} is a file this run writes into --proj_dir {proj}, so the run "
                                  f"would overwrite its own input. Copy it elsewhere or use another --proj_dir.")
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint. "
                              f"Use --resume auto to pick the newest in proj_dir.")
        return self

    @property
    def strategy_spec(self) -> StrategySpec:
        return StrategySpec.parse(self.strategy)

    @property
    def adapter(self) -> AdapterConfig:
        """The AdapterConfig these settings describe (ConfigError naming the flag when one is invalid)."""
        return AdapterConfig(method=self.peft, b=self.bone_b, grouping=self.bone_grouping, lora_r=self.lora_r,
                             lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, miss_r=self.miss_r,
                             targets=tuple(self.adapter_targets), train_parts=tuple(self.train_parts),
                             quant=self.quant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_fingerprint(self) -> str:
        """Hash of the settings a resumed run must share with the run it resumes (adapter and data shape)."""
        settings = {k: getattr(self, k) for k in ADAPTER_SETTINGS}
        if settings["quant"] == "none":
            del settings["quant"]  # runs from before --quant keep their fingerprint
        if settings["peft"] != "miss":
            del settings["miss_r"]  # only MiSS has it; other runs keep their fingerprint
        payload = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {text!r}")


def _flag_kwargs(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for a dataclass field type. A bool is a switch (`--dry_run`) that also takes
    an explicit value (`--dry_run 1`, `--dry_run false`)."""
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    if origin is list:
        return {"type": str, "nargs": "*"}
    if args:  # Optional[X]
        return _flag_kwargs(args[0])
    if tp is bool:
        return {"type": _parse_bool, "nargs": "?", "const": True}
    return {"type": tp}


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean ...?" for a misspelled flag."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        if "unrecognized arguments" in message:
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description="Fine-tune an RWKV6 (x060) model with Bone (or LoRA/PiSSA/full), via PyTorch Lightning.",
    )
    parser.add_argument("--config", default=None, help="YAML file of settings; flags override its values")
    hints = get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name}", default=None, **_flag_kwargs(hints[f.name]),
                            help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    return parser


def _unknown_keys_message(path: Path, unknown: list[str]) -> str:
    known = [f.name for f in fields(TrainConfig)]
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return (f"{path}: unknown settings {', '.join(parts)}. Valid keys: {', '.join(known)}. "
            f"`python train.py --help` describes each.")


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
        unknown = sorted(set(loaded) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ConfigError(_unknown_keys_message(path, unknown))
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
