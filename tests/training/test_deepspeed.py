"""The DeepSpeed path on CPU: Lightning `fit` with ZeRO 1/2/3 (DS_ACCELERATOR=cpu, gloo, one process) through a
test-only subclass of SafeDeepSpeedStrategy that lifts Lightning's CUDA-only checks. Training states hold only
the trainable tensors, resume is bit-exact, checkpoints that do not fit or would run code are refused, and the
loss scale turns an accumulation window into the token-weighted mean gradient.

Each ZeRO stage runs once in a subprocess with a hard timeout (`python -m tests.training.test_deepspeed STAGE OUT`),
which isolates DeepSpeed's global state and its accelerator choice from the pytest process; the tests below
inspect what it wrote.
"""
from __future__ import annotations

import copy
import json
import os
import pickletools
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from src.errors import CheckpointError
from src.run_files import weights_file
from src.training.deepspeed import SafeDeepSpeedStrategy, _deepspeed_safe_globals, safe_load
from tests.cpu_deepspeed import CPUSafeDeepSpeedStrategy, cpu_strategy, use_cpu_deepspeed

REPO = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT_S = 300  # typical run: ~15 s per stage
MICRO_BSZ, ACCUMULATE, SEQ_LEN, VOCAB = 2, 2, 8, 64
STEPS_PER_EPOCH = 2  # optimizer steps
EXTRA_TRAINABLE = "model.blocks.0.att.value.weight"


# ----------------------------------------------------------------------------------------------- worker side
def _is_trainable(name: str) -> bool:
    return name.endswith((".att.key.weight", ".att.time_state")) or name == "ln_out.weight"


def _tiny_model(extra_trainable: tuple[str, ...] = ()) -> torch.nn.Module:
    from src.model import RWKV6
    from tests.tiny import tiny_config, tiny_state_dict

    mcfg = tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB, d_mix=8, d_decay=16)
    model = RWKV6(mcfg)
    model.load_base_state_dict(tiny_state_dict(mcfg))
    model.enable_time_state()  # state tuning's tensors train under every ZeRO stage too
    for name, p in model.named_parameters():
        p.requires_grad_(_is_trainable(name) or f"model.{name}" in extra_trainable)
    return model


def _samples(n_windows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Samples with different loss-token counts; `window_tokens` is the count of the sample's whole window."""
    g = torch.Generator().manual_seed(seed)
    window = MICRO_BSZ * ACCUMULATE
    out = []
    for _ in range(n_windows):
        rows = []
        for _ in range(window):
            x = torch.randint(0, VOCAB, (SEQ_LEN + 1,), generator=g)
            mask = torch.zeros(SEQ_LEN)
            mask[: int(torch.randint(1, SEQ_LEN + 1, (1,), generator=g))] = 1.0
            rows.append({"input": x[:-1], "target": x[1:], "mask": mask})
        total = sum(float(r["mask"].sum()) for r in rows)
        out += [{**r, "window_tokens": torch.tensor(int(total), dtype=torch.int64)} for r in rows]
    return out


def _trainable_copy(lm: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """The trainable tensors in fp32; under ZeRO-3 they are gathered first (outside forward/backward each rank
    holds only its partition and `p` itself is empty)."""
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    if stage != 3:
        return {n: p.detach().float().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in params.items()}


def _fit(stage: int, proj: Path, epochs: int, resume: Path | None = None, precision: str = "fp32",
         extra_trainable: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `trainer.fit` like src.training.fit.fit, with the real module and training-state callback. When resuming,
    the trainable tensors start as constants, so that only a real restore gives the uninterrupted run's result."""
    import pytorch_lightning as pl

    from src.config import TrainConfig
    from src.training.callbacks import TrainingStateCallback
    from src.training.module import RWKVLightningModule
    from src.training.strategy import LIGHTNING_PRECISION

    cfg = TrainConfig(strategy=f"deepspeed_stage_{stage}", precision=precision, accelerator="cpu", micro_bsz=MICRO_BSZ,
                      accumulate_grad_batches=ACCUMULATE, epoch_count=epochs, lr_init=1e-2, lr_final=1e-3,
                      lr_schedule="cosine", warmup_steps=1, weight_decay=0.01, grad_clip=1.0, proj_dir=str(proj),
                      keep_last=5)
    model = _tiny_model(extra_trainable)
    model = model.to(torch.bfloat16) if precision == "bf16" else model
    if resume is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(0.5)
    exported: list[str] = []
    lm = RWKVLightningModule(model, cfg, STEPS_PER_EPOCH * 2, "base-fp")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=cpu_strategy(stage), precision=LIGHTNING_PRECISION[precision],
        max_epochs=epochs, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=cfg.grad_clip or None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(proj),
        callbacks=[TrainingStateCallback(cfg, lambda tag, tr: exported.append(weights_file(proj, tag).name))],
    )
    loader = DataLoader(_samples(STEPS_PER_EPOCH, seed=1), batch_size=MICRO_BSZ, shuffle=False)
    trainer.fit(lm, loader, ckpt_path=str(resume) if resume else None)
    partitioned = all(p.numel() == 0 for p in lm.parameters())
    return {"loss": float(trainer.callback_metrics["loss"]), "params": _trainable_copy(lm, stage),
            "global_step": trainer.global_step, "exported": exported, "partitioned": partitioned}


def _refused(run: Callable[[], Any]) -> dict[str, Any]:
    """Runs a fit that must fail; records the error for the tests to check (an unexpected success is recorded too)."""
    try:
        run()
    except Exception as e:  # recorded and asserted on by the tests
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": "no error"}


class _RunsCode:
    """Unpickling this calls open(path, "w") (pickled as io.open): it creates `path`, proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _poisoned_copy(state: Path, dest: Path, shard_glob: str, marker: Path) -> Path:
    """A copy of a training state with a code-running object added to one shard."""
    shutil.copytree(state, dest)
    shard = next((dest / "checkpoint").glob(shard_glob))
    data = safe_load(shard, "cpu")
    data["payload"] = _RunsCode(marker)
    torch.save(data, shard)
    return dest


def _grad_check(stage: int, proj: Path) -> dict[str, torch.Tensor]:
    """One optimizer step of plain SGD (lr 1) over one accumulation window: the update is minus the gradient
    the trainer produced. Reference: the plain-torch gradient of the window's token-weighted mean loss."""
    from src.loss import masked_token_loss_sum
    from src.training.module import RWKVLightningModule

    class SGDModule(RWKVLightningModule):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(list(self.trainable_named_parameters().values()), lr=1.0)

    before = {f"model.{n}": p.detach().clone() for n, p in _tiny_model().named_parameters() if p.requires_grad}
    after = _fit_one_window(stage, proj, SGDModule)
    ref_model = _tiny_model()
    window = _samples(1, seed=1)
    loss = sum(masked_token_loss_sum(ref_model(b["input"][None]), b["target"][None], b["mask"][None])[0]
               for b in window) / window[0]["window_tokens"]
    loss.backward()
    out = {}
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            out[f"ref/model.{n}"] = p.grad.detach().clone()
            out[f"update/model.{n}"] = before[f"model.{n}"] - after[f"model.{n}"]
    return out


def _fit_one_window(stage: int, proj: Path, module_cls: Any) -> dict[str, torch.Tensor]:
    import pytorch_lightning as pl

    from src.config import TrainConfig

    cfg = TrainConfig(strategy=f"deepspeed_stage_{stage}", precision="fp32", accelerator="cpu", micro_bsz=MICRO_BSZ,
                      accumulate_grad_batches=ACCUMULATE, epoch_count=1, grad_clip=0.0, l2wrap=0, proj_dir=str(proj))
    lm = module_cls(_tiny_model(), cfg, 1, "base-fp")
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=cpu_strategy(stage), precision="32-true",
                         max_epochs=1, accumulate_grad_batches=ACCUMULATE, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(proj))
    trainer.fit(lm, DataLoader(_samples(1, seed=1), batch_size=MICRO_BSZ, shuffle=False))
    assert trainer.global_step == 1
    return _trainable_copy(lm, stage)


def _state(proj: Path, epoch: int) -> Path:
    return proj / "checkpoints" / f"state-epoch{epoch:06d}.ckpt"


def worker(stage: int, out: Path) -> None:
    """Everything the tests inspect for one ZeRO stage, written under `out`."""
    use_cpu_deepspeed()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    straight = _fit(stage, out / "A", epochs=2)
    first = _fit(stage, out / "B", epochs=1)
    resumed = _fit(stage, out / "C", epochs=2, resume=_state(out / "B", 1))
    straight_state2 = safe_load(_shard(_state(out / "A", 2), "*optim_states.pt"), "cpu")
    torch.save(straight_state2, out / "A_state2_optim.pt")
    rerun = _fit(stage, out / "A", epochs=2, resume=_state(out / "A", 1))  # rewrites the existing epoch-2 state
    for tag, run in (("straight", straight), ("first", first), ("resumed", resumed), ("rerun", rerun)):
        results[tag] = {k: run[k] for k in ("loss", "global_step", "exported", "partitioned")}
        tensors.update({f"{tag}/{n}": t for n, t in run["params"].items()})
    tensors.update({f"init/model.{n}": p.detach().clone() for n, p in _tiny_model().named_parameters()
                    if p.requires_grad})
    results["mismatch"] = _refused(lambda: _fit(stage, out / "D", epochs=2, resume=_state(out / "B", 1),
                                                extra_trainable=(EXTRA_TRAINABLE,)))
    for shard in ("model_states", "optim_states"):
        bad = _poisoned_copy(_state(out / "B", 1), out / f"poison_{shard}", f"*{shard}.pt", out / f"ran_{shard}")
        results[f"poison_{shard}"] = _refused(lambda shard=shard, bad=bad: _fit(stage, out / f"E_{shard}", epochs=2,
                                                                               resume=bad))
    tensors.update(_grad_check(stage, out / "G"))
    bf16 = _fit(stage, out / "H", epochs=1, precision="bf16")
    results["bf16"] = {"loss": bf16["loss"], "global_step": bf16["global_step"]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "results.json").write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module", params=[1, 2, 3], ids=["zero1", "zero2", "zero3"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    stage = request.param
    out = tmp_path_factory.mktemp(f"ds_zero{stage}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),  # any JIT build stays out of the shared cache
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.training.test_deepspeed", str(stage), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, f"DeepSpeed CPU worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"stage": stage, "out": out, "results": json.loads((out / "results.json").read_text()),
            "tensors": load_file(str(out / "tensors.safetensors"))}


def _group(tensors: dict[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
    return {k[len(tag) + 1:]: v for k, v in tensors.items() if k.startswith(tag + "/")}


def _trainable_names() -> set[str]:
    return {f"model.{n}" for n, p in _tiny_model().named_parameters() if p.requires_grad}


def _shard(state: Path, glob: str) -> Path:
    found = sorted((state / "checkpoint").glob(glob))
    assert len(found) == 1, f"{state}: expected one {glob}, found {found}"
    return found[0]


def _pickle_globals(path: Path) -> set[str]:
    """Every module.name a torch.save zip's pickle references."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    names = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            names.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":  # module and name are the two strings pushed just before
            names.add(f"{ops[i - 2][1]}.{ops[i - 1][1]}")
    return names


def _tensor_leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts/lists, by path (the optimizer moments, steps and fp32 master weights)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in _tensor_leaves(sub, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_training_runs_and_loss_is_finite(run: dict[str, Any]) -> None:
    res = run["results"]
    assert res["straight"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert res["first"]["global_step"] == STEPS_PER_EPOCH
    for tag in ("straight", "first", "resumed", "rerun", "bf16"):
        assert torch.isfinite(torch.tensor(res[tag]["loss"])), (tag, res[tag])
    init, trained = _group(run["tensors"], "init"), _group(run["tensors"], "straight")
    assert set(trained) == _trainable_names()
    assert all(not torch.equal(init[n], trained[n]) for n in trained), "some trainable tensor did not change"
    assert res["first"]["exported"] == ["adapter-epoch1.safetensors"]


@pytest.mark.slow
def test_training_state_holds_only_trainable_tensors(run: dict[str, Any]) -> None:
    state = _state(run["out"] / "B", 1)
    assert state.is_dir() and not (run["out"] / "B" / "checkpoints" / f".{state.name}.tmp").exists()
    model_states = safe_load(_shard(state, "*model_states.pt"), "cpu")
    assert set(model_states["module"]) == _trainable_names()
    assert not model_states["frozen_param_shapes"] and not model_states["frozen_param_fragments"]
    assert "rwkv_bone" in model_states and "state_dict" not in model_states
    optim = safe_load(_shard(state, "*optim_states.pt"), "cpu")["optimizer_state_dict"]
    if run["stage"] == 3:
        n_flat = sum(t.numel() for t in optim["fp32_flat_groups"])
    else:
        n_flat = sum(t.numel() for t in optim["single_partition_of_fp32_groups"]) - sum(optim["group_paddings"])
    assert n_flat == sum(t.numel() for t in _group(run["tensors"], "init").values())


@pytest.mark.slow
def test_resume_is_bit_exact(run: dict[str, Any]) -> None:
    res, tensors = run["results"], run["tensors"]
    assert res["resumed"]["global_step"] == res["straight"]["global_step"]
    assert res["resumed"]["exported"] == ["adapter-epoch2.safetensors"]  # it trained the second epoch only
    straight, resumed = _group(tensors, "straight"), _group(tensors, "resumed")
    assert set(straight) == set(resumed) == _trainable_names()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert res["resumed"]["loss"] == res["straight"]["loss"]
    a = _tensor_leaves(safe_load(_shard(_state(run["out"] / "A", 2), "*optim_states.pt"), "cpu"))
    c = _tensor_leaves(safe_load(_shard(_state(run["out"] / "C", 2), "*optim_states.pt"), "cpu"))
    assert a.keys() == c.keys() and any(k.endswith("/exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], c[key]), key


@pytest.mark.slow
def test_resume_from_an_older_state_replaces_the_newer_one(run: dict[str, Any]) -> None:
    """Resuming epoch 1 in the same proj_dir retrains epoch 2 and writes its state over the existing one
    (os.replace cannot replace a non-empty folder); the result equals the uninterrupted run's."""
    res, tensors = run["results"], run["tensors"]
    assert res["rerun"]["global_step"] == res["straight"]["global_step"]
    straight, rerun = _group(tensors, "straight"), _group(tensors, "rerun")
    for name in straight:
        assert torch.equal(straight[name], rerun[name]), name
    folder = run["out"] / "A" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["state-epoch000001.ckpt", "state-epoch000002.ckpt"]
    before = _tensor_leaves(safe_load(run["out"] / "A_state2_optim.pt", "cpu"))
    after = _tensor_leaves(safe_load(_shard(_state(run["out"] / "A", 2), "*optim_states.pt"), "cpu"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.slow
def test_resume_with_other_trainable_tensors_is_refused(run: dict[str, Any]) -> None:
    err = run["results"]["mismatch"]
    assert err["type"] == "CheckpointError", err
    assert "do not match this run's trainable tensors" in err["message"] and EXTRA_TRAINABLE in err["message"]


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["model_states", "optim_states"])
def test_code_running_shard_is_refused(run: dict[str, Any], shard: str) -> None:
    err = run["results"][f"poison_{shard}"]
    assert err["type"] == "CheckpointError", err
    assert "refused to load" in err["message"] and "GLOBAL io.open" in err["message"] and shard in err["message"]
    assert not (run["out"] / f"ran_{shard}").exists()


@pytest.mark.slow
def test_allowlist_covers_real_shards(run: dict[str, Any]) -> None:
    """Besides torch's own tensor machinery (allowed by weights_only itself) and OrderedDict, the shards
    reference only the DeepSpeed data classes we allow, and they all load."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_safe_globals()}
    shards = sorted((_state(run["out"] / "A", 2) / "checkpoint").glob("*.pt"))
    shards += sorted((_state(run["out"] / "H", 1) / "checkpoint").glob("*.pt"))  # bf16 optimizer shard
    assert len(shards) == 4
    for path in shards:
        names = {n for n in _pickle_globals(path) if not n.startswith("torch.") and n != "collections.OrderedDict"}
        assert names <= allowed, (path.name, names - allowed)
        safe_load(path, "cpu")


@pytest.mark.slow
def test_accumulation_window_gives_token_weighted_mean_gradient(run: dict[str, Any]) -> None:
    ref, update = _group(run["tensors"], "ref"), _group(run["tensors"], "update")
    assert set(ref) == set(update) == _trainable_names()
    for name in ref:
        assert ref[name].abs().max() > 0
        torch.testing.assert_close(update[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_zero3_leaves_parameters_partitioned_after_fit(run: dict[str, Any]) -> None:
    """Under ZeRO-3 every parameter is empty outside forward/backward, so whatever reads trained tensors
    after (or between) fits, such as the adapter export, must gather them first; ZeRO 1/2 keep them whole."""
    assert run["results"]["straight"]["partitioned"] == (run["stage"] == 3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_strategy_is_configured_as_make_strategy(stage: int) -> None:
    from src.config import TrainConfig
    from src.training.strategy import make_strategy

    real = make_strategy(TrainConfig(strategy=f"deepspeed_stage_{stage}"))
    assert type(real) is SafeDeepSpeedStrategy and real.exclude_frozen_parameters
    expected = copy.deepcopy(real.config)
    if stage == 3:
        expected["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cpu = cpu_strategy(stage)
    assert cpu.config == expected and cpu.exclude_frozen_parameters
    assert real.config["data_types"] == {"grad_accum_dtype": "fp32"}
    own = {n for n, v in vars(CPUSafeDeepSpeedStrategy).items() if callable(v)}
    assert own == {"setup_environment", "setup_distributed", "_setup_model_and_optimizer"}


def test_allowlist_holds_only_data_classes() -> None:
    for cls in _deepspeed_safe_globals():
        assert isinstance(cls, type) and cls.__module__.startswith("deepspeed."), cls


def test_safe_load_refuses_code_and_the_payload_is_live(tmp_path: Path) -> None:
    live, refused = tmp_path / "live", tmp_path / "refused"
    torch.save({"w": torch.ones(2), "x": _RunsCode(live)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert live.exists(), "the payload does not run code, so the refusal tests would prove nothing"
    torch.save({"w": torch.ones(2), "x": _RunsCode(refused)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*Unsupported global: GLOBAL io\.open\)"):
        safe_load(tmp_path / "bad.pt", "cpu")
    assert not refused.exists()
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "control.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        safe_load(tmp_path / "truncated.pt", "cpu")


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
