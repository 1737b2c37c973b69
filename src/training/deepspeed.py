"""DeepSpeed through Lightning, made safe for adapter training: checkpoints hold only the trainable tensors
(the frozen base is reloaded from --load_model), every checkpoint file is read with weights_only=True, and
the loaded module state is checked to be exactly the trainable tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning.strategies import DeepSpeedStrategy

from src.checkpoint import key_mismatch, safe_torch_load
from src.errors import CheckpointError


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and containers (plain data holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """A DeepSpeed checkpoint shard through the project's one safe loader, allowing DeepSpeed's data classes."""
    return safe_torch_load(path, what="DeepSpeed checkpoint shard", allowed_globals=_deepspeed_safe_globals(),
                           fix="delete this training state to resume from the previous one", map_location=map_location)


class _SafeCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine so that every load goes through `safe_load`."""

    def __init__(self, inner: Any):
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SafeDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with safe loading and an exact check of the restored tensors."""

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        engine = self.deepspeed_engine
        if not isinstance(engine.checkpoint_engine, _SafeCheckpointEngine):
            engine.checkpoint_engine = _SafeCheckpointEngine(engine.checkpoint_engine)
        model_states = sorted(Path(checkpoint_path).glob("checkpoint/*model_states.pt"))
        if not model_states:
            raise CheckpointError(f"{checkpoint_path}: not a DeepSpeed training state "
                                  f"(no checkpoint/*model_states.pt).")
        saved = {k: () for k in safe_load(model_states[0], "cpu")["module"]}
        trainable = {n: () for n, p in engine.module.named_parameters() if p.requires_grad}
        report = key_mismatch(trainable, saved, limit=5)
        if report:
            raise CheckpointError(f"{checkpoint_path}: the saved tensors do not match this run's trainable tensors ("
                                  + "; ".join(report) + "). Resume with the original adapter settings.")
        # Frozen base tensors are not in the checkpoint (exclude_frozen_parameters); the key sets were
        # checked to be exactly the trainable ones above, so the non-strict module load is complete.
        self.lightning_module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            self.lightning_module.strict_loading = True
