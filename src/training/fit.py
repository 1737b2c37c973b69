"""`fit`: builds the data loaders and the Lightning Trainer for a configuration, trains (resuming if asked) and
exports the trained tensors. The only entry point train.py needs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from src.atomic import atomic_write_text
from src.config import TrainConfig
from src.run_files import FINAL_TAG, config_path, loss_plot_path, metrics_path, state_dir
from src.rwkv6 import RWKV6
from src.training.callbacks import MetricsCallback, SampleCallback, TrainingStateCallback, read_sample_prompts
from src.training.health import NonFiniteGuard
from src.training.module import RWKVLightningModule
from src.training.plot import plot_metrics
from src.training.states import SafeAtomicCheckpointIO, remove_stale_temporaries, resolve_resume, supersede_newer_states
from src.training.strategy import LIGHTNING_PRECISION, make_strategy, trained_tensors


def fit(cfg: TrainConfig, model: RWKV6, base_fp: str, export: Any) -> pl.Trainer:
    """Train `model` (adapters injected, trainable tensors marked) per `cfg`, resuming if asked.

    `export(model, trained, tag) -> Path` writes the trained tensors (adapter file or full model) under the run
    file name for `tag` ("epoch{N}" or "final"); `trained` holds the fp32 values of the trainable parameters
    (see `trained_tensors`)."""
    from src.data.dataset import build_datasets
    from src.data.loader import make_loaders
    from src.data.tokenizer import WorldTokenizer

    proj = Path(cfg.proj_dir)
    proj.mkdir(parents=True, exist_ok=True)
    loggers: list[Any] = []
    if cfg.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.wandb, save_dir=str(proj), config=cfg.to_dict()))
    plugins = [] if cfg.strategy_spec.deepspeed else [SafeAtomicCheckpointIO()]

    def export_on_rank0(tag: str, trainer: pl.Trainer) -> None:
        tensors = trained_tensors(model, trainer.strategy)  # a collective under DeepSpeed
        if trainer.is_global_zero:
            written = export(model, tensors, tag)
            atomic_write_text(config_path(proj), _config_yaml(cfg))
            print(f"saved {written}")

    tokenizer = WorldTokenizer()
    metrics = MetricsCallback(cfg)
    state_callback = TrainingStateCallback(cfg, export_on_rank0)
    callbacks: list[Any] = [metrics, state_callback,  # a step's metrics row is written before its state
                            NonFiniteGuard(str(state_dir(cfg.proj_dir)), cfg.skip_nonfinite,
                                           check_grads=cfg.precision != "fp16")]
    if cfg.sample_prompts:
        callbacks.append(SampleCallback(read_sample_prompts(cfg.sample_prompts), cfg.sample_tokens, metrics, tokenizer))
    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=make_strategy(cfg),
        precision=LIGHTNING_PRECISION[cfg.precision], max_epochs=cfg.epoch_count,
        accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=cfg.grad_clip or None,
        logger=loggers or False, enable_checkpointing=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, log_every_n_steps=cfg.log_every, default_root_dir=str(proj), plugins=plugins,
        callbacks=callbacks, enable_model_summary=False,
    )
    world = trainer.world_size
    window = cfg.micro_bsz * cfg.accumulate_grad_batches * world
    data = build_datasets(cfg.data_file, cfg.data_type, cfg.ctx_len, tokenizer, cfg.seed,
                          val_fraction=0.0 if cfg.val_file else cfg.val_fraction, val_file=cfg.val_file,
                          num_samples=cfg.epoch_steps * window, vocab_size=model.cfg.vocab_size,
                          role_markers=cfg.role_markers, skip_bad_records=cfg.skip_bad_records,
                          log=print if trainer.is_global_zero else None)
    loaders = make_loaders(data.train, data.val, cfg.micro_bsz, cfg.accumulate_grad_batches, trainer.global_rank, world)
    state_callback.sampler = loaders.train.sampler  # positioned on a mid-epoch resume
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
    export_on_rank0(FINAL_TAG, trainer)
    if trainer.is_global_zero:
        if metrics_path(proj).exists():
            what = cfg.peft if cfg.peft != "none" else "all weights"
            plot_metrics(proj, loss_plot_path(proj), title=f"{what}: {proj}")
    return trainer


def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
