"""DeepSpeed on CPU for tests: a subclass of SafeDeepSpeedStrategy that lifts Lightning's CUDA-only steps and
nothing else, and a switch that makes `src.training.strategy.make_strategy` (and so `train.py`) build it. Use it only in
a subprocess (DeepSpeed keeps global state and picks its accelerator once per process)."""
from __future__ import annotations

import argparse
import importlib
from typing import Any

import src.training.deepspeed as ds_module
from src.config import TrainConfig
from src.training.deepspeed import SafeDeepSpeedStrategy


class CPUSafeDeepSpeedStrategy(SafeDeepSpeedStrategy):
    """SafeDeepSpeedStrategy with the three CUDA-only steps of Lightning's DeepSpeedStrategy replaced."""

    def setup_environment(self) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only supported on CUDA GPUs"

    def setup_distributed(self) -> None:
        from lightning_fabric.utilities.seed import reset_seed

        reset_seed()  # as DeepSpeedStrategy, minus the device-index check (CPU devices have no index)
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # Lightning passes the CUDA index (None)
            config=self.config, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


class _CPUStrategyForMake(CPUSafeDeepSpeedStrategy):
    """What make_strategy builds once `use_cpu_deepspeed` is on: ZeRO-3 partitions every tensor here
    (persistence threshold 0), as it does real-sized ones."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.config["zero_optimization"]["stage"] == 3:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0


def use_cpu_deepspeed() -> None:
    """From now on, in this process, make_strategy builds the CPU subclass, and the preflight treats a DeepSpeed
    run with --accelerator cpu as the CPU run it is here (for real runs it rightly demands a CUDA GPU).
    DeepSpeed's CPU comm backend would JIT-build a shared-memory all-reduce op (minutes); gloo does the
    collectives instead."""
    import src.training.preflight as preflight

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ds_module.SafeDeepSpeedStrategy = _CPUStrategyForMake  # type: ignore[misc]
    real_check = preflight.check_hardware

    def cpu_run(cfg: TrainConfig) -> bool:
        return cfg.strategy_spec.deepspeed and cfg.accelerator == "cpu"

    preflight.check_hardware = lambda cfg, facts: [] if cpu_run(cfg) else real_check(cfg, facts)


def cpu_strategy(stage: int) -> SafeDeepSpeedStrategy:
    """The strategy make_strategy builds for --strategy deepspeed_stage_{stage}, CPU-capable (the switch is
    undone before returning, so this is safe in the pytest process)."""
    from src.training.strategy import make_strategy

    saved = ds_module.SafeDeepSpeedStrategy
    ds_module.SafeDeepSpeedStrategy = _CPUStrategyForMake  # type: ignore[misc]
    try:
        return make_strategy(TrainConfig(strategy=f"deepspeed_stage_{stage}"))
    finally:
        ds_module.SafeDeepSpeedStrategy = saved  # type: ignore[misc]
