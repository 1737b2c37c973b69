"""Every file a training run writes into --proj_dir, by name: the one place that knows them. Everything else
(the trainer, config validation, scripts, tests) asks here.

    proj_dir/
      adapter-epoch{N}.safetensors, adapter-final.safetensors   the adapter (model-*.safetensors for --peft none)
      config.yaml                                               the resolved configuration
      metrics.jsonl, loss.png                                   per-step metrics and the loss curve
      checkpoints/state-epoch{N:06d}.ckpt                       training state at the end of epoch N (--resume)
      checkpoints/state-epoch{N:06d}-step{S:09d}.ckpt           a state inside epoch N, after optimizer step S
      checkpoints/superseded/                                   states set aside by a resume from an older one
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
SUPERSEDED_DIR = "superseded"
STATE_PREFIX = "state-epoch"
STATE_SUFFIX = ".ckpt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FINAL_TAG = "final"
_OUTPUTS = re.compile(r"(adapter|model)-(epoch\d+|final)\.safetensors|metrics\.jsonl|config\.yaml|loss\.png")


def weights_file(proj_dir: str | Path, tag: str, full_model: bool = False) -> Path:
    """adapter-{tag}.safetensors (model-{tag}.safetensors for full training); tag "epoch{N}" or "final"."""
    return Path(proj_dir) / f"{'model' if full_model else 'adapter'}-{tag}.safetensors"


def epoch_tag(epoch: int) -> str:
    return f"epoch{epoch}"


def state_dir(proj_dir: str | Path) -> Path:
    return Path(proj_dir) / CHECKPOINT_DIR


def state_path(proj_dir: str | Path, epoch: int) -> Path:
    return state_dir(proj_dir) / f"{STATE_PREFIX}{epoch:06d}{STATE_SUFFIX}"


def mid_epoch_state_path(proj_dir: str | Path, epoch: int, step: int) -> Path:
    """The state written inside epoch `epoch` (1-based) after global optimizer step `step`."""
    return state_dir(proj_dir) / f"{STATE_PREFIX}{epoch:06d}-step{step:09d}{STATE_SUFFIX}"


def state_order(path: Path) -> tuple[int, float] | None:
    """Sort key of a training-state name, oldest first: (epoch, step) inside an epoch, (epoch, inf) at its end;
    None when the name is not a training state."""
    name = path.name
    if not (name.startswith(STATE_PREFIX) and name.endswith(STATE_SUFFIX)):
        return None
    epoch, _, step = name[len(STATE_PREFIX):-len(STATE_SUFFIX)].partition("-step")
    if not epoch.isdigit() or (step and not step.isdigit()):
        return None
    return int(epoch), int(step) if step else float("inf")


def config_path(proj_dir: str | Path) -> Path:
    return Path(proj_dir) / CONFIG


def metrics_path(proj_dir: str | Path) -> Path:
    return Path(proj_dir) / METRICS


def loss_plot_path(proj_dir: str | Path) -> Path:
    return Path(proj_dir) / LOSS_PLOT


def is_run_output(path: Path, proj_dir: Path) -> bool:
    """Whether `path` is one of the files a run writes into proj_dir (or its checkpoints folder)."""
    path, proj = path.resolve(), proj_dir.resolve()
    return path.parent == state_dir(proj) or (path.parent == proj and _OUTPUTS.fullmatch(path.name) is not None)


def read_loss_curves(proj_dir: str | Path) -> tuple[dict[int, float], dict[int, float]]:
    """({optimizer step: training loss}, {step: validation loss}) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path(proj_dir).read_text().splitlines() if line.strip()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})
