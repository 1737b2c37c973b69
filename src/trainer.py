"""The Lightning side of training: the LightningModule around the plain RWKV6 model, the optimizer and
LR schedule, the safe/atomic checkpoint I/O, the training-state and metrics callbacks, and the trainer
factory. The model itself never imports Lightning.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from src.atomic import atomic_path, atomic_save, atomic_write_text
from src.config import TrainConfig
from src.errors import CheckpointError, WriteError
from src.health import NonFiniteGuard
from src.loss import L2Wrap, masked_token_loss_sum
from src.model import RWKV6

CHECKPOINT_DIR = "checkpoints"
# Settings a resumed run must share with the run it resumes (they decide which samples a step reads), and the
# schedule settings that may change on resume (the new values apply from the resumed step on).
RESUME_FIXED = ("micro_bsz", "accumulate_grad_batches", "epoch_steps", "devices", "num_nodes", "data_file",
                "data_type", "seed")
RESUME_SCHEDULE = ("lr_init", "lr_final", "lr_schedule", "warmup_steps", "epoch_count")
STATE_PREFIX = "state-epoch"
STATE_SUFFIX = ".ckpt"


# ----------------------------------------------------------------------------------------------- LR schedule
def lr_at(step: int, lr_init: float, lr_final: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Learning rate after `step` optimizer steps: linear warmup from 1% of lr_init over `warmup_steps`,
    then decay from lr_init to lr_final over the remaining steps (cosine, linear, exponential or constant)."""
    if step < warmup_steps:
        return lr_init * (0.01 + 0.99 * step / warmup_steps)
    if schedule == "constant":
        return lr_init
    p = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr_init + (lr_final - lr_init) * p
    return lr_init * (lr_final / lr_init) ** p  # exponential


class LRMultiplier:
    """LambdaLR multiplier. Holds plain values only: LambdaLR stores this object's __dict__ in its state
    dict, which must load with weights_only=True."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        self.lr_init, self.lr_final = cfg.lr_init, cfg.lr_final
        self.warmup_steps, self.schedule, self.total_steps = cfg.warmup_steps, cfg.lr_schedule, total_steps

    def __call__(self, step: int) -> float:
        lr = lr_at(step, self.lr_init, self.lr_final, self.warmup_steps, self.schedule, self.total_steps)
        return lr / self.lr_init


def is_weight_decayed(name: str, param: Tensor) -> bool:
    """The official RWKV rule: weight decay applies to tensors whose squeezed shape has at least 2 dims, and never
    to the `time_*` tensors (token-shift mixes, decays, bonus and their low-rank mixers). Adapter matrices (bone,
    LoRA A/B) and full linear weights are decayed; LayerNorm/GroupNorm vectors are not."""
    return param.squeeze().dim() >= 2 and not name.rpartition(".")[2].startswith("time_")


# ----------------------------------------------------------------------------------------------- fingerprints
def base_fingerprint(model: nn.Module) -> str:
    """A cheap content hash of the base weights (names, shapes, dtypes and a strided sample of values), taken
    before adapters are injected. A run refuses to resume onto a different base model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{sample.sum().item():.6e}|{sample.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- RNG capture
def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors/lists, so the training state loads with weights_only=True."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- checkpoint I/O
class SafeAtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes atomically (temp + rename) and loads with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such training-state file.")
        if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: cannot read this training state (empty or not a torch.save zip archive); "
                                  f"it is truncated or corrupt. Delete it to resume from the previous one.")
        try:
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # re-raised with the file named; torch raises several types here
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(
                    f"{path}: refused to load. It contains Python objects other than tensors and plain values, and "
                    f"loading them could run code. Only resume from training states this trainer wrote."
                ) from e
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: cannot read this training state ({reason}); it is "
                                  f"truncated or corrupt. Delete it to resume from the previous one.") from e
        if not isinstance(checkpoint, dict) or "rwkv_bone" not in checkpoint:
            raise CheckpointError(f"{path} is not a training state written by this trainer (no 'rwkv_bone' record); "
                                  f"resume from a proj_dir/checkpoints/state-epoch*.ckpt file, or use --resume auto.")
        return checkpoint


def state_dir(proj_dir: str | Path) -> Path:
    return Path(proj_dir) / CHECKPOINT_DIR


def list_states(proj_dir: str | Path) -> list[Path]:
    """Complete training states in proj_dir, oldest first (temp files of interrupted writes are ignored)."""
    folder = state_dir(proj_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(STATE_PREFIX) and p.name.endswith(STATE_SUFFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STATE_PREFIX): -len(STATE_SUFFIX)]))


def remove_stale_temporaries(proj_dir: str | Path) -> list[Path]:
    """Delete what writes cut short by a kill left in proj_dir and its checkpoints folder: atomic_path's
    ".<name>.<random>.tmp" files and DeepSpeed's ".<state>.tmp" folders. Call before a run starts writing."""
    removed = []
    for folder in (Path(proj_dir), state_dir(proj_dir)):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
    return removed


def replace_folder(src: Path, dest: Path) -> None:
    """Move folder `src` to `dest`, replacing an existing `dest` (os.replace cannot replace a non-empty folder).
    The old folder is first renamed to a ".tmp" name that `remove_stale_temporaries` deletes, so a kill at any
    point leaves either state complete or none under `dest`'s name, never a mixture."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old)
    else:
        os.replace(src, dest)


def supersede_newer_states(proj_dir: str | Path, resumed: Path) -> list[Path]:
    """When a run resumes from a state that is not the newest, the newer states belong to the abandoned
    continuation: move them to checkpoints/superseded/ (kept, not deleted) so that a later `--resume auto`
    cannot pick one of them up instead of the new run's states."""
    states = list_states(proj_dir)
    if resumed.resolve() not in [s.resolve() for s in states]:
        return []
    newer = states[[s.resolve() for s in states].index(resumed.resolve()) + 1:]
    moved = []
    target = state_dir(proj_dir) / "superseded"
    for s in newer:
        target.mkdir(exist_ok=True)
        dest = target / s.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(s, dest)
        moved.append(dest)
    return moved


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """`--resume auto`: newest complete state in proj_dir or None (fresh start); `--resume PATH`: that path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        states = list_states(cfg.proj_dir)
        return states[-1] if states else None
    return Path(cfg.resume)


# ----------------------------------------------------------------------------------------------- module
class RWKVLightningModule(pl.LightningModule):
    """Wraps an RWKV6 (with adapters injected) for Lightning. Only `trainable` parameters are optimised,
    checkpointed and restored; the frozen base comes from --load_model at every start."""

    def __init__(self, model: RWKV6, cfg: TrainConfig, total_steps: int, base_fp: str):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.base_fp = base_fp
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

    # -- what is trained and saved
    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_named_parameters()
        if "state_dict" in checkpoint:  # absent under DeepSpeed, which saves module states itself
            checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rwkv_bone"] = {
            "base_fingerprint": self.base_fp,
            "adapter_fingerprint": self.cfg.adapter_fingerprint(),
            "config": json.dumps(self.cfg.to_dict()),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("rwkv_bone")
        if meta is None:
            raise CheckpointError("this training state was not written by this trainer (no 'rwkv_bone' record).")
        if meta["base_fingerprint"] != self.base_fp:
            raise CheckpointError(
                "refusing to resume: the training state was made on a different base model than --load_model "
                f"(fingerprint {meta['base_fingerprint']} vs {self.base_fp}). Resume with the same base checkpoint, "
                "or start a new run in another --proj_dir."
            )
        old = json.loads(meta["config"])
        refused = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_FIXED if old.get(k) != getattr(self.cfg, k)]
        if refused:
            raise CheckpointError(
                "refusing to resume: " + "; ".join(refused) + ". These settings decide which samples each optimizer "
                "step reads, so the run could not continue where it stopped. Resume with the original values, or start "
                "a new run in another --proj_dir."
            )
        changed = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_SCHEDULE if old.get(k) != getattr(self.cfg, k)]
        if changed:
            print("resuming with a changed schedule (" + "; ".join(changed) + "): from the resumed step on, the learning "
                  "rate follows the new settings.")
        if meta["adapter_fingerprint"] != self.cfg.adapter_fingerprint():
            diffs = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in
                     ("peft", "bone_b", "bone_grouping", "lora_r", "lora_alpha", "adapter_targets", "train_parts", "ctx_len")
                     if old.get(k) != getattr(self.cfg, k)]
            raise CheckpointError(
                "refusing to resume: the adapter configuration differs from the run being resumed ("
                + "; ".join(diffs) + "). Use the original settings, or a new --proj_dir."
            )
        set_rng_state(meta["rng"])

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Restore exactly the trainable tensors (the base is loaded separately); any difference is an error."""
        trainable = self.trainable_named_parameters()
        missing = sorted(set(trainable) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(trainable))
        shape = [k for k in set(trainable) & set(state_dict) if trainable[k].shape != state_dict[k].shape]
        if missing or unexpected or shape:
            raise CheckpointError(
                "the training state does not fit this run's trainable tensors: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {shape[:5]}. "
                "Resume with the same --peft/--bone_b/--bone_grouping/targets as the original run."
            )
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(state_dict[k])
        return None

    # -- steps
    def _loss_scales(self) -> tuple[float, float]:
        """(step, engine): multiplying a micro-batch's loss sum / window tokens by both gives its share of the
        optimizer step's token mean. `step` undoes Lightning's 1/accumulate and DDP's 1/world_size averaging;
        `engine` undoes DeepSpeed's second 1/accumulate (1 elsewhere). L2Wrap goes between the two, so that
        its gradient has the same strength under every strategy."""
        accumulate = self.trainer.accumulate_grad_batches
        engine = float(accumulate) if "deepspeed" in self.cfg.strategy else 1.0
        return float(self.trainer.world_size * accumulate), engine

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["input"])  # (B, T, V)
        loss_sum, n_tokens = masked_token_loss_sum(logits, batch["target"], batch["mask"])
        window_tokens = batch["window_tokens"][0].clamp(min=1).to(loss_sum.dtype)  # int64 count, exact in fp32 < 2^24
        step_scale, engine_scale = self._loss_scales()
        loss = loss_sum / window_tokens * step_scale
        if self.cfg.l2wrap:
            loss = L2Wrap.apply(loss, logits)
        loss = loss * engine_scale
        mean = (loss_sum / n_tokens.clamp(min=1.0)).detach()
        self.log("loss", mean, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input"].shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(batch["input"])
        loss_sum, n = masked_token_loss_sum(logits, batch["target"], batch["mask"])
        self._val_sum += loss_sum.double()
        self._val_count += n.double()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        val = (total / count.clamp(min=1.0)).float()
        self.log("val_loss", val, prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        named = self.trainable_named_parameters()
        decay = [p for n, p in named.items() if is_weight_decayed(n, p)]
        no_decay = [p for n, p in named.items() if not is_weight_decayed(n, p)]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        kw = dict(lr=self.cfg.lr_init, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.adam_eps)
        if self.cfg.strategy.endswith("_offload"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        else:
            optimizer = torch.optim.AdamW(groups, fused=self.device.type == "cuda", **kw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRMultiplier(self.cfg, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Install this run's LR schedule after any restore: LambdaLR's state holds the multiplier's settings and
        the optimizer's state the last LR, so a resumed run would otherwise keep the old schedule. For an
        unchanged configuration this rewrites the same values (resume stays bit-exact)."""
        if not self.trainer.lr_scheduler_configs:  # a subclass configured an optimizer without a schedule
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        multiplier = LRMultiplier(self.cfg, self.total_steps)
        scheduler.lr_lambdas = [multiplier] * len(scheduler.lr_lambdas)
        scheduler.base_lrs = [self.cfg.lr_init] * len(scheduler.base_lrs)
        lr = self.cfg.lr_init * multiplier(scheduler.last_epoch)
        for group in self.trainer.optimizers[0].param_groups:
            group["initial_lr"], group["lr"] = self.cfg.lr_init, lr
        scheduler._last_lr = [lr] * len(scheduler.base_lrs)


# ----------------------------------------------------------------------------------------------- callbacks
class TrainingStateCallback(Callback):
    """At every epoch end: every `epoch_save` epochs the adapter file and the resolved config in proj_dir,
    then an atomic training state (keep the last K) for --resume. In this order, a state on disk means its
    epoch's files are complete: a run killed in between redoes the epoch and writes them again."""

    def __init__(self, cfg: TrainConfig, export_adapter: Any):
        self.cfg = cfg
        self.export_adapter = export_adapter  # callable(path: Path) -> None, rank 0 only

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.cfg.epoch_save == 0 or epoch == self.cfg.epoch_count:
            self.export_adapter(Path(self.cfg.proj_dir) / f"adapter-epoch{epoch}.safetensors", trainer)
        folder = state_dir(self.cfg.proj_dir)
        final = folder / f"{STATE_PREFIX}{epoch:06d}{STATE_SUFFIX}"
        if "deepspeed" in self.cfg.strategy:
            tmp = folder / f".{final.name}.tmp"
            if trainer.is_global_zero and tmp.exists():
                shutil.rmtree(tmp)
            trainer.strategy.barrier()
            trainer.save_checkpoint(tmp, weights_only=False)  # a folder of per-rank shards
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                replace_folder(tmp, final)
        else:
            trainer.save_checkpoint(final, weights_only=False)  # SafeAtomicCheckpointIO: temp + rename on rank 0
        if trainer.is_global_zero:
            for old in list_states(self.cfg.proj_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier()


class MetricsCallback(Callback):
    """Appends one JSON line per optimizer step (loss, lr, tokens/s) and per validation to
    proj_dir/metrics.jsonl (rank 0); on resume, rows after the resumed step are dropped first."""

    def __init__(self, cfg: TrainConfig):
        self.path = Path(cfg.proj_dir) / "metrics.jsonl"
        self.every = cfg.log_every
        self._t0 = time.perf_counter()
        self._tokens = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.path.exists():
            text = self.path.read_text()
            complete = text[: text.rfind("\n") + 1]  # a kill or a full disk mid-append can cut the last line
            keep = [line for line in complete.splitlines()
                    if line.strip() and json.loads(line)["step"] <= trainer.global_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self._t0 = time.perf_counter()
        self._tokens = 0

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise WriteError(f"could not append to {self.path} ({e}); free some space, then continue with "
                             f"--resume auto (a cut last line is dropped then).") from e

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += int(batch["input"].numel()) * trainer.world_size
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        elapsed = time.perf_counter() - self._t0
        tps = self._tokens / max(elapsed, 1e-9)
        pl_module.log("tok/s", tps, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            m = trainer.callback_metrics
            self._append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                          "loss": float(m["loss"]), "lr": float(m["lr"]), "tokens_per_s": tps})
        self._t0 = time.perf_counter()
        self._tokens = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self._append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                          "val_loss": float(trainer.callback_metrics["val_loss"])})


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss (and validation loss) against optimizer step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(list(train), list(train.values()), label="train loss", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- strategies
def make_strategy(cfg: TrainConfig) -> Any:
    """Lightning strategy for --strategy; DeepSpeed variants save only trainable tensors and load safely.

    Under DeepSpeed with bf16/fp16 every parameter (base and adapter) is cast to that dtype and the model runs
    without autocast; the optimizer keeps an fp32 master copy of the trainable tensors, and gradients are
    accumulated across micro-batches in fp32 (`data_types.grad_accum_dtype`)."""
    if not cfg.strategy.startswith("deepspeed"):
        return cfg.strategy
    from src.deepspeed_strategy import SafeDeepSpeedStrategy

    stage = int(cfg.strategy.split("_")[2])
    offload = cfg.strategy.endswith("_offload")
    strategy = SafeDeepSpeedStrategy(
        stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
        exclude_frozen_parameters=True)
    strategy.config["data_types"] = {"grad_accum_dtype": "fp32"}
    return strategy


def trained_tensors(model: nn.Module, strategy: Any) -> dict[str, Tensor]:
    """{name: fp32 CPU copy} of every trainable parameter of `model`. Under DeepSpeed the values come from the
    optimizer's fp32 master copy (the module holds bf16/fp16 copies), gathered one tensor at a time, so ZeRO-3
    never materialises the whole model on a device. A collective under DeepSpeed: call it on every rank."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(strategy, DeepSpeedStrategy):
        return {n: p.detach().float().cpu() for n, p in trainable.items()}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in trainable.items():
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise CheckpointError(f"DeepSpeed holds no fp32 master copy of {name}; cannot export it.")
        out[name] = full.detach().float().cpu()
    return out


# ----------------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, model: RWKV6, base_fp: str, export: Any) -> pl.Trainer:
    """Train `model` (adapters injected, trainable tensors marked) per `cfg`, resuming if asked.

    `export(model, trained, path) -> Path` writes the trained tensors (adapter file or full model); `trained` holds
    the fp32 values of the trainable parameters (see `trained_tensors`)."""
    from src.data.dataset import build_datasets
    from src.data.loader import make_loaders
    from src.data.tokenizer import WorldTokenizer

    proj = Path(cfg.proj_dir)
    proj.mkdir(parents=True, exist_ok=True)
    loggers: list[Any] = []
    if cfg.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.wandb, save_dir=str(proj), config=cfg.to_dict()))
    plugins = [] if cfg.strategy.startswith("deepspeed") else [SafeAtomicCheckpointIO()]

    def export_on_rank0(path: Path, trainer: pl.Trainer) -> None:
        tensors = trained_tensors(model, trainer.strategy)  # a collective under DeepSpeed
        if trainer.is_global_zero:
            written = export(model, tensors, path)
            atomic_write_text(proj / "config.yaml", _config_yaml(cfg))
            print(f"saved {written}")

    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=make_strategy(cfg),
        precision=LIGHTNING_PRECISION[cfg.precision], max_epochs=cfg.epoch_count,
        accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=cfg.grad_clip or None,
        logger=loggers or False, enable_checkpointing=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, log_every_n_steps=cfg.log_every, default_root_dir=str(proj), plugins=plugins,
        callbacks=[TrainingStateCallback(cfg, export_on_rank0), MetricsCallback(cfg),
                   NonFiniteGuard(str(state_dir(cfg.proj_dir)), cfg.skip_nonfinite, check_grads=cfg.precision != "fp16")],
        enable_model_summary=False,
    )
    tokenizer = WorldTokenizer()
    world = trainer.world_size
    window = cfg.micro_bsz * cfg.accumulate_grad_batches * world
    data = build_datasets(cfg.data_file, cfg.data_type, cfg.ctx_len, tokenizer, cfg.seed,
                          val_fraction=0.0 if cfg.val_file else cfg.val_fraction, val_file=cfg.val_file,
                          num_samples=cfg.epoch_steps * window, vocab_size=model.cfg.vocab_size)
    loaders = make_loaders(data.train, data.val, cfg.micro_bsz, cfg.accumulate_grad_batches, trainer.global_rank, world)
    total_steps = loaders.steps_per_epoch * cfg.epoch_count
    if trainer.is_global_zero:
        print(f"data: {data.data_type}, {data.train.num_samples} training samples/epoch, "
              f"{loaders.steps_per_epoch} optimizer steps/epoch x {cfg.epoch_count} epochs = {total_steps} steps; "
              f"validation: {data.val.num_samples if data.val is not None else 0} samples")
    lm = RWKVLightningModule(model, cfg, total_steps, base_fp)
    ckpt = resolve_resume(cfg)
    if trainer.is_global_zero:
        for stale in remove_stale_temporaries(proj):
            print(f"removed {stale}, left by an interrupted write")
        if ckpt is not None:
            print(f"resuming from {ckpt}")
            for moved in supersede_newer_states(proj, ckpt):
                print(f"moved {moved.name} to {moved.parent}: it is newer than the resumed state")
    trainer.fit(lm, loaders.train, loaders.val, ckpt_path=str(ckpt) if ckpt else None)
    export_on_rank0(proj / "adapter-final.safetensors", trainer)
    if trainer.is_global_zero:
        metrics = proj / "metrics.jsonl"
        if metrics.exists():
            plot_metrics(metrics, proj / "loss.png")
    return trainer


LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
