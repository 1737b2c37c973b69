"""The LightningModule around the plain RWKV6 model: training and validation steps with the token-weighted
loss, what is trained, checkpointed and restored, resume checks, and the optimizer with its schedule."""
from __future__ import annotations

import json
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from src.checkpoint import key_mismatch
from src.config import ADAPTER_SETTINGS, TrainConfig
from src.errors import CheckpointError
from src.rwkv6 import RWKV6
from src.training.optimizer import LRMultiplier, is_weight_decayed
from src.training.rng import rng_state, set_rng_state
from src.training.sequence import sequence_loss

# Settings a resumed run must share with the run it resumes (they decide which samples a step reads), and the
# schedule settings that may change on resume (the new values apply from the resumed step on).
RESUME_FIXED = ("micro_bsz", "accumulate_grad_batches", "epoch_steps", "devices", "num_nodes", "data_type", "seed",
                "role_markers", "skip_bad_records")
RESUME_SCHEDULE = ("lr_init", "lr_final", "lr_schedule", "warmup_steps", "epoch_count")


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
            checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in checkpoint["state_dict"].items()
                                        if k in trainable}
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
        old = json.loads(meta["config"])
        if old.get("quant", "none") != self.cfg.quant:  # the base fingerprint differs too: name the setting
            raise CheckpointError(
                f"refusing to resume: quant: {old.get('quant', 'none')!r} -> {self.cfg.quant!r}; the run being resumed "
                "trained on a base held in another quantisation. Use the original --quant, or a new --proj_dir."
            )
        if meta["base_fingerprint"] != self.base_fp:
            raise CheckpointError(
                "refusing to resume: the training state was made on a different base model than --load_model "
                f"(fingerprint {meta['base_fingerprint']} vs {self.base_fp}). Resume with the same base checkpoint, "
                "or start a new run in another --proj_dir."
            )
        refused = [f"{k}: {old[k]!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_FIXED  # keys older states lack: skip
                   if k in old and old[k] != getattr(self.cfg, k)]
        if refused:
            raise CheckpointError(
                "refusing to resume: " + "; ".join(refused) + ". These settings decide which samples each optimizer "
                "step reads, so the run could not continue where it stopped. Resume with the original values, or start "
                "a new run in another --proj_dir."
            )
        changed = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_SCHEDULE
                   if old.get(k) != getattr(self.cfg, k)]
        if changed:
            print("resuming with a changed schedule (" + "; ".join(changed) + "): from the resumed step on, the "
                  "learning rate follows the new settings.")
        if meta["adapter_fingerprint"] != self.cfg.adapter_fingerprint():
            diffs = [f"{k}: {old.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in ADAPTER_SETTINGS
                     if old.get(k, "none" if k == "quant" else None) != getattr(self.cfg, k)]
            raise CheckpointError(
                "refusing to resume: the adapter configuration differs from the run being resumed ("
                + "; ".join(diffs) + "). Use the original settings, or a new --proj_dir."
            )
        set_rng_state(meta["rng"])

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Restore exactly the trainable tensors (the base is loaded separately); any difference is an error."""
        trainable = self.trainable_named_parameters()
        report = key_mismatch({k: p.shape for k, p in trainable.items()}, {k: t.shape for k, t in state_dict.items()},
                              limit=5)
        if report:
            raise CheckpointError("the training state does not fit this run's trainable tensors: " + "; ".join(report)
                                  + ". Resume with the same --peft/--bone_b/--bone_grouping/targets as the "
                                  "original run.")
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
        engine = float(accumulate) if self.cfg.strategy_spec.deepspeed else 1.0
        return float(self.trainer.world_size * accumulate), engine

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        window_tokens = int(batch["window_tokens"][0].clamp(min=1))  # an int64 count: exact
        step_scale, engine_scale = self._loss_scales()
        out = sequence_loss(self.model, batch["input"], batch["target"], batch["mask"], step_scale / window_tokens,
                            bool(self.cfg.l2wrap), self.cfg.chunk_ctx, self.cfg.head_chunk)
        loss = out.objective * engine_scale
        mean = out.loss_sum / out.n_tokens.clamp(min=1.0)
        self.log("loss", mean, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input"].shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = sequence_loss(self.model, batch["input"], batch["target"], batch["mask"], 1.0, False, self.cfg.chunk_ctx,
                            self.cfg.head_chunk)
        self._val_sum += out.loss_sum.double()
        self._val_count += out.n_tokens.double()

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
        if self.cfg.strategy_spec.offload:
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
