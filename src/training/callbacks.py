"""Lightning callbacks: the training state (and adapter export) at every epoch end, and the metrics log."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from src.atomic import atomic_write_text
from src.config import TrainConfig
from src.data.dataset import lightning_resume_position
from src.errors import ConfigError, WriteError
from src.run_files import epoch_tag, metrics_path, mid_epoch_state_path, state_path
from src.training.states import list_states, replace_folder


class TrainingStateCallback(Callback):
    """Training states for --resume, atomic, the last `keep_last` kept.

    At every epoch end: every `epoch_save` epochs the adapter file and the resolved config in proj_dir, then the
    state. In this order, a state on disk means its epoch's files are complete: a run killed in between redoes
    the epoch and writes them again. Inside an epoch, at optimizer-step boundaries: a state every
    `save_every_steps` steps and/or once `save_every_minutes` have passed since the last state. A resumed run
    continues from the exact sample (the sampler is positioned from the restored loop counters), with the RNG
    restored by the module; states fall on step boundaries, so no gradient accumulation is half done."""

    def __init__(self, cfg: TrainConfig, export_adapter: Any, sampler: Any = None):
        self.cfg = cfg
        self.export_adapter = export_adapter  # callable(tag: str, trainer) -> None; a collective under DeepSpeed
        self.sampler = sampler  # the training EpochSampler, positioned on a mid-epoch resume
        self._last_save = time.monotonic()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.sampler is None:
            return
        epoch, consumed = lightning_resume_position(checkpoint, self.cfg.micro_bsz, trainer.world_size)
        if consumed < self.sampler.per_rank * trainer.world_size:  # a state inside an epoch: continue that epoch
            self.sampler.set_position(epoch, consumed)
        # an epoch-end state: the next epoch starts from its first sample (set_epoch resets the sampler)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or (batch_idx + 1) >= trainer.num_training_batches:
            return  # not a step boundary, or the epoch's last step (the epoch-end state follows)
        due = bool(self.cfg.save_every_steps) and trainer.global_step % self.cfg.save_every_steps == 0
        if self.cfg.save_every_minutes:
            late = time.monotonic() - self._last_save >= 60 * self.cfg.save_every_minutes
            due = due or bool(trainer.strategy.broadcast(late))  # rank 0's clock decides for every rank
        if due:
            self._write(trainer,
                        mid_epoch_state_path(self.cfg.proj_dir, trainer.current_epoch + 1, trainer.global_step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.cfg.epoch_save == 0 or epoch == self.cfg.epoch_count:
            self.export_adapter(epoch_tag(epoch), trainer)
        self._write(trainer, state_path(self.cfg.proj_dir, epoch))

    def _write(self, trainer: pl.Trainer, final: Any) -> None:
        folder = final.parent
        if self.cfg.strategy_spec.deepspeed:
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
        self._last_save = time.monotonic()


class MetricsCallback(Callback):
    """Appends one JSON line per optimizer step (loss, lr, tokens/s) and per validation to
    proj_dir/metrics.jsonl (rank 0); on resume, rows after the resumed step are dropped first."""

    def __init__(self, cfg: TrainConfig):
        self.path = metrics_path(cfg.proj_dir)
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

    def append(self, row: dict[str, Any]) -> None:
        """Append one row (rank 0 only), fsynced."""
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
            self.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                          "loss": float(m["loss"]), "lr": float(m["lr"]), "tokens_per_s": tps})
        self._t0 = time.perf_counter()
        self._tokens = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                          "val_loss": float(trainer.callback_metrics["val_loss"])})


def read_sample_prompts(path: str | Path) -> list[str]:
    """Prompts for --sample_prompts: a .jsonl file of {"prompt": ...} (or {"text": ...}) records, or a text file
    with one prompt per line in which the two characters backslash-n stand for a newline."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sample_prompts {path}: no such file (a .jsonl of {{\"prompt\": ...}} or a .txt file).")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no}: not a JSON object ({e.msg}); write one {{\"prompt\": ...}} "
                                  f"per line.") from e
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{line_no}: expected {{\"prompt\": \"...\"}}.")
            prompts.append(text)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ConfigError(f"--sample_prompts {path}: no prompts in the file.")
    return prompts


class SampleCallback(Callback):
    """At every validation, continue each --sample_prompts prompt greedily (up to `sample_tokens` tokens,
    stopping at a blank line) and record what the model says: a metrics.jsonl row {"step", "samples": [...]}
    and, with --wandb, a W&B table. Every rank generates (ZeRO-3 gathers parameters collectively); rank 0
    records."""

    def __init__(self, prompts: list[str], max_new_tokens: int, metrics: MetricsCallback, tokenizer: Any):
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.metrics = metrics
        self.tokenizer = tokenizer

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        from src.evaluation.evaluate import generate

        model = pl_module.model  # type: ignore[attr-defined]
        was_training = model.training
        samples = [{"prompt": p, "output": generate(model, self.tokenizer, p, self.max_new_tokens)}
                   for p in self.prompts]
        model.train(was_training)
        if not trainer.is_global_zero:
            return
        self.metrics.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "samples": samples})
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):  # WandbLogger
                logger.log_text(key="samples", columns=["step", "prompt", "output"],
                                data=[[trainer.global_step, s["prompt"], s["output"]] for s in samples])
