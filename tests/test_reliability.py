"""Crash safety: train.py killed anywhere (SIGKILL, also in the middle of writing a training state) and resumed
with --resume auto ends bit-identical to an uninterrupted run, and never leaves an unreadable file; a failed
write (disk full) keeps the previous file and raises our error; a NaN/Inf loss stops the run at its step."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

import src.training.fit
import train
from src.adapters.config import AdapterConfig
from src.adapters.export import merge_checkpoint_file
from src.adapters.files import load_adapter_file
from src.adapters.inject import save_adapter
from src.atomic import atomic_write_text
from src.checkpoint import save_tensors
from src.config import TrainConfig
from src.data.binidx import BinIdxDataset, BinIdxWriter
from src.errors import RWKVBoneError
from src.model import RWKV6
from src.training.callbacks import MetricsCallback
from src.training.health import NonFiniteGuard, NonFiniteLossError
from src.training.module import RWKVLightningModule
from src.training.states import SafeAtomicCheckpointIO
from tests.tiny import tiny_config, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 5
KILLS = 5
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what atomic_path leaves behind when killed mid-write


# ---------------------------------------------------------------------------------------------- assets
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reliability_assets")
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=65536)
    torch.save(tiny_state_dict(cfg, seed=5), d / "base.pth")
    lines = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}."})
             for a in range(1, 5) for b in range(1, 3)]
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n")  # 8 documents: 6 train (3 steps/epoch), 2 validation
    return {"base": d / "base.pth", "sft": d / "sft.jsonl"}


def train_args(assets: dict[str, Path], proj: Path, **over: object) -> list[str]:
    args = {"load_model": assets["base"], "data_file": assets["sft"], "data_type": "sft", "proj_dir": proj,
            "peft": "bone", "bone_b": 32, "ctx_len": 32, "micro_bsz": 2, "accumulate_grad_batches": 1,
            "epoch_count": EPOCHS, "lr_init": 1e-2, "lr_final": 1e-3, "warmup_steps": 1, "accelerator": "cpu",
            "precision": "fp32", "wkv_backend": "torch", "val_fraction": 0.25, "resume": "auto", "seed": 7}
    args.update(over)
    return [item for k, v in args.items() for item in (f"--{k}", str(v))]


def launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start train.py; its output goes to `log` (a pipe nobody reads would fill up and block it)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


# ---------------------------------------------------------------------------------------------- what a kill may leave
def newest_epoch(proj: Path) -> int:
    states = [int(p.name[len("state-epoch"): -len(".ckpt")]) for p in (proj / "checkpoints").glob("state-epoch*.ckpt")]
    return max(states, default=0)


def assert_everything_readable(proj: Path) -> list[str]:
    """Every file a user keeps loads; the only other files are temporaries of interrupted writes (returned)."""
    temps = []
    for f in sorted(proj.rglob("*")):
        if f.is_dir():
            continue
        if TEMP_FILE.match(f.name):
            temps.append(str(f.relative_to(proj)))
        elif f.parent.name == "checkpoints":
            assert re.fullmatch(r"state-epoch\d{6}\.ckpt", f.name), f
            state = torch.load(f, map_location="cpu", weights_only=True)
            assert {"state_dict", "optimizer_states", "rwkv_bone"} <= set(state), f
            assert state["state_dict"] and all(torch.isfinite(t).all() for t in state["state_dict"].values())
        elif f.suffix == ".safetensors":
            tensors, _, _ = load_adapter_file(f)
            assert load_file(f).keys() == tensors.keys() and tensors, f
        elif f.name == "metrics.jsonl":
            text = f.read_text()
            assert text.endswith("\n") or not text, "metrics.jsonl ends in a partial line"
            [json.loads(line) for line in text.splitlines()]
        elif f.name == "config.yaml":
            assert yaml.safe_load(f.read_text())["bone_b"] == 32
        else:
            assert f.name == "loss.png", f"unexpected file {f}"
    return temps


def metric_rows(proj: Path) -> list[tuple[object, ...]]:
    rows = [json.loads(line) for line in (proj / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in rows]


def assert_same_result(proj: Path, reference: Path) -> None:
    """Bit-identical adapter files (every epoch's and the final one) and the same logged losses."""
    adapters = sorted(p.name for p in reference.glob("adapter-*.safetensors"))
    assert sorted(p.name for p in proj.glob("adapter-*.safetensors")) == adapters
    for name in adapters:
        a, b = load_file(reference / name), load_file(proj / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    assert metric_rows(proj) == metric_rows(reference)


# ---------------------------------------------------------------------------------------------- kill anywhere
def kill_after(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """SIGKILL after `delay` seconds; False when the run had already ended by itself."""
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    return False


def _names(folder: Path, prefix: str, suffix: str) -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return {n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix)}
    return set()


# (folder below proj_dir, name prefix, name suffix) of the file whose appearance triggers the kill
EVENTS = {
    "while writing a training state": ("checkpoints", ".state-epoch", ".tmp"),
    "right after a training state is complete": ("checkpoints", "state-epoch", ".ckpt"),
    "while writing an adapter file": ("", ".adapter-epoch", ".tmp"),
}


def kill_on_event(proc: subprocess.Popen[bytes], proj: Path, event: str, timeout: float) -> str | None:
    """SIGKILL the moment a new file of `event` appears (polled every 0.5 ms). None when the run ended first;
    else whether the file (a temporary one) was still there after the kill, i.e. the write was cut."""
    sub, prefix, suffix = EVENTS[event]
    folder = proj / sub
    before = _names(folder, prefix, suffix)  # left by earlier runs
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"train.py still running after {timeout:.0f} s")
        new = _names(folder, prefix, suffix) - before
        if new:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            cut = suffix == ".tmp" and bool(new & _names(folder, prefix, suffix))
            return f"killed {event} {sorted(new)}" + (" (cut mid-write)" if cut else "")
        time.sleep(0.0005)
    return None


@pytest.mark.slow
def test_kill_anywhere_then_resume_is_bit_identical(assets: dict[str, Path], tmp_path: Path) -> None:
    """KILLS kills at seeded random times plus one at each event of EVENTS, all in one run that is resumed
    with --resume auto after each; a run that reaches the end before its kill must be exact too, and the
    next kills go to a new run."""
    straight, out = tmp_path / "straight", tmp_path / "train.log"
    start = time.monotonic()
    finish(launch(train_args(assets, straight), out), out, timeout=600)
    duration = time.monotonic() - start
    assert assert_everything_readable(straight) == []

    rng = random.Random(20240601)
    plan: list[str | None] = [None] * KILLS  # None: a random time
    for i, event in enumerate(EVENTS):
        plan.insert(1 + 2 * i, event)
    log: list[str] = []
    cycle, launches = 0, 0
    proj = tmp_path / "killed0"
    while plan:
        launches += 1
        assert launches <= 3 * (KILLS + len(EVENTS)), f"kills did not land: {log}"
        done = newest_epoch(proj)
        proc = launch(train_args(assets, proj), out)
        if plan[0] is None:
            delay = rng.uniform(0.05, 1.0) * duration * (EPOCHS - done + 1) / (EPOCHS + 1)
            outcome = f"killed at {delay:.1f} s" if kill_after(proc, delay) else None
        else:
            outcome = kill_on_event(proc, proj, plan[0], timeout=600)
        log.append(f"run {cycle}, from epoch {done}: {outcome or 'ended before the kill'}")
        if outcome is None:  # the run got to the end first: it must be exact already; kill a new run
            assert proc.returncode == 0, out.read_text(errors="replace")[-3000:]
            assert_same_result(proj, straight)
            cycle += 1
            proj = tmp_path / f"killed{cycle}"
            continue
        plan.pop(0)
        temps = assert_everything_readable(proj)
        log[-1] += f"; newest state: epoch {newest_epoch(proj)}; temporaries: {temps}"
    finish(launch(train_args(assets, proj), out), out, timeout=600)
    print("\n".join(log))
    assert assert_everything_readable(proj) == [], "temporary files of interrupted writes were not cleaned up"
    assert_same_result(proj, straight)


# ---------------------------------------------------------------------------------------------- failed writes
@contextlib.contextmanager
def disk_full_after(limit: int) -> Iterator[None]:
    """Writes beyond `limit` bytes of any file fail (EFBIG), as on a full disk: RLIMIT_FSIZE, SIGXFSZ ignored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _big_tensors(seed: int) -> dict[str, Tensor]:
    return {"a": torch.randn(200_000, generator=torch.Generator().manual_seed(seed)), "b": torch.ones(3)}


def _write_tensors(suffix: str) -> Callable[[Path, int], None]:
    return lambda path, seed: save_tensors(path.with_suffix(suffix), _big_tensors(seed))


def _write_state(path: Path, seed: int) -> None:
    SafeAtomicCheckpointIO().save_checkpoint({"state_dict": _big_tensors(seed), "epoch": seed},
                                             path.with_suffix(".ckpt"))


def _write_text(path: Path, seed: int) -> None:
    atomic_write_text(path.with_suffix(".yaml"), f"seed: {seed}\n" * 30_000)


def _write_binidx(path: Path, seed: int) -> None:
    with BinIdxWriter(path, dtype=np.uint16) as w:
        w.add_document(np.arange(100_000, dtype=np.int64) % 60_000 + seed)


def _write_adapter(path: Path, seed: int) -> None:
    cfg = AdapterConfig(b=32)
    model = _tiny_model(seed=0)
    from src.adapters.inject import inject_adapters

    inject_adapters(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bone"):
                p.normal_(generator=torch.Generator().manual_seed(seed))
    save_adapter(model, cfg, path.with_suffix(".safetensors"))


def _tiny_model(seed: int) -> RWKV6:
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=4096)
    model = RWKV6(cfg)
    model.load_base_state_dict(tiny_state_dict(cfg, seed=seed))
    return model


WRITERS = {"pth": _write_tensors(".pth"), "safetensors": _write_tensors(".safetensors"), "training_state": _write_state,
           "text": _write_text, "binidx": _write_binidx, "adapter": _write_adapter}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_disk_full_keeps_the_previous_file_and_raises_our_error(tmp_path: Path, kind: str) -> None:
    write = WRITERS[kind]
    write(tmp_path / "out", 1)
    before = _snapshot(tmp_path)
    with disk_full_after(64 * 1024), pytest.raises(RWKVBoneError, match=r"(?i)could not write.*out"):
        write(tmp_path / "out", 2)
    assert _snapshot(tmp_path) == before, "the previous file changed or a temporary file was left behind"
    write(tmp_path / "out", 3)  # and the next write, with space again, works
    assert _snapshot(tmp_path) != before


def test_disk_full_while_merging_keeps_the_previous_output(tmp_path: Path) -> None:
    base = tmp_path / "base.pth"
    torch.save(tiny_state_dict(tiny_config(n_layer=2, n_embd=64, vocab_size=4096), seed=0), base)
    adapter = tmp_path / "adapter.safetensors"
    _write_adapter(adapter, 1)
    for out in (tmp_path / "merged.pth", tmp_path / "merged.safetensors"):
        merge_checkpoint_file(base, adapter, out)
        before = _snapshot(tmp_path)
        _write_adapter(adapter, 2)
        with disk_full_after(64 * 1024), pytest.raises(RWKVBoneError, match=r"(?i)could not write.*merged"):
            merge_checkpoint_file(base, adapter, out)
        after = _snapshot(tmp_path)
        assert after[out.name] == before[out.name] and set(after) == set(before)
        _write_adapter(adapter, 1)


def test_binidx_pair_survives_a_failed_index_write(tmp_path: Path) -> None:
    """The .bin and .idx are one dataset. 10,000 one-token documents make a 20 kB .bin and a 200 kB .idx, so a
    full disk hits the .idx only; the new .bin must not be left beside the old .idx (same sizes: the reader
    could not even tell)."""
    def write(seed: int) -> None:
        with BinIdxWriter(tmp_path / "d", dtype=np.uint16) as w:
            for i in range(10_000):
                w.add_document([seed + i])

    write(1)
    before = _snapshot(tmp_path)
    with disk_full_after(64 * 1024), pytest.raises(RWKVBoneError, match=r"could not write .*d\.idx"):
        write(2)
    assert _snapshot(tmp_path) == before
    assert int(BinIdxDataset(tmp_path / "d").get(0)[0]) == 1


def test_resume_drops_a_metrics_line_cut_by_a_crash(tmp_path: Path) -> None:
    """A crash or a full disk in the middle of an append can leave metrics.jsonl without its last newline;
    the next start must drop that fragment (and rows after the resumed step), not fail on it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "val_loss": 2.0}\n'
                                            '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    callback = MetricsCallback(TrainConfig(proj_dir=str(tmp_path)))
    callback.on_train_start(SimpleNamespace(is_global_zero=True, global_step=2), None)  # type: ignore[arg-type]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "val_loss": 2.0}\n'


# ---------------------------------------------------------------------------------------------- NaN / Inf
class Toy(pl.LightningModule):
    """y = w.x regression; the optimizer step numbers in `poison` (1-based) get a NaN in their loss, and
    `inf_grad` steps a finite loss with a non-finite gradient."""

    def __init__(self, poison: set[int], inf_grad: set[int] | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.poison, self.inf_grad = poison, inf_grad or set()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.lin(batch).pow(2).mean()
        step = self.trainer.global_step + 1
        if step in self.poison:
            loss = loss * float("nan")
        if step in self.inf_grad:
            loss = loss + (self.lin.bias - self.lin.bias.detach()).abs().sqrt().sum()  # d/dx sqrt(|x|) at 0
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


class Snapshots(pl.Callback):
    """Weights and optimizer moments after every optimizer step: {step: tensors}."""

    def __init__(self) -> None:
        self.after: dict[int, list[Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        opt = trainer.optimizers[0]
        moments = [opt.state[p]["exp_avg"].clone() for p in pl_module.parameters() if p in opt.state]
        self.after[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()] + moments


def fit_toy(model: Toy, guard: NonFiniteGuard, accumulate: int = 1, steps: int = 6,
            snaps: Snapshots | None = None) -> Snapshots:
    snaps = snaps or Snapshots()
    data = DataLoader(torch.randn(steps * accumulate, 4, generator=torch.Generator().manual_seed(0)), batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[guard, snaps])
    torch.manual_seed(0)
    trainer.fit(model, data)
    return snaps


def test_nan_loss_stops_before_the_step_changes_anything() -> None:
    model, snaps = Toy(poison={3}), Snapshots()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in micro-batch 2 \(loss nan\).*optimizer step 3 "
                                                 r"\(epoch 1\).*proj/checkpoints"):
        fit_toy(model, NonFiniteGuard("proj/checkpoints"), snaps=snaps)
    assert sorted(snaps.after) == [1, 2]
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), snaps.after[2], strict=False))


def test_nan_loss_with_accumulation_names_the_micro_batch() -> None:
    with pytest.raises(NonFiniteLossError, match=r"micro-batch 4 \(loss nan\), 5 \(loss nan\).*optimizer step 3"):
        fit_toy(Toy(poison={3}), NonFiniteGuard("c"), accumulate=2)


def test_nonfinite_gradient_with_a_finite_loss_stops() -> None:
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient \(first in lin.bias\).*optimizer step 2"):
        fit_toy(Toy(poison=set(), inf_grad={2}), NonFiniteGuard("c"))
    # with check_grads=False (fp16, where the gradient scaler skips such steps) only the next loss is caught
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .*optimizer step 3"):
        fit_toy(Toy(poison=set(), inf_grad={2}), NonFiniteGuard("c", check_grads=False))


def test_skip_nonfinite_skips_exactly_the_bad_steps_then_stops_at_the_limit() -> None:
    snaps = fit_toy(Toy(poison={2, 4}), NonFiniteGuard("c", skip_limit=2))
    assert len(snaps.after) == 6
    for skipped in (2, 4):  # weights and Adam moments exactly as before the skipped step
        assert all(torch.equal(a, b) for a, b in zip(snaps.after[skipped], snaps.after[skipped - 1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snaps.after[3], snaps.after[2], strict=True))
    assert all(torch.isfinite(t).all() for t in snaps.after[6])
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 5 .*after skipping 2 step\(s\)"):
        fit_toy(Toy(poison={2, 4, 5}), NonFiniteGuard("c", skip_limit=2))


def test_control_without_the_guard_nan_reaches_the_weights() -> None:
    """The toy really poisons the weights when nothing guards them, so the tests above can fail."""
    model = Toy(poison={3})
    snaps = Snapshots()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[snaps])
    trainer.fit(model, DataLoader(torch.randn(6, 4), batch_size=1))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_train_py_stops_on_nan_and_keeps_the_last_good_state(assets: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    real_trainer, real_step = pl.Trainer, RWKVLightningModule.training_step

    def guarded_trainer(*args: object, **kw: object) -> pl.Trainer:
        callbacks = list(kw["callbacks"])  # type: ignore[call-overload]
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard(str(tmp_path / "p" / "checkpoints")))
        return real_trainer(*args, **{**kw, "callbacks": callbacks})

    def poisoned_step(self: RWKVLightningModule, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 4 else loss  # optimizer step 5, in epoch 2

    monkeypatch.setattr(src.training.fit.pl, "Trainer", guarded_trainer)
    monkeypatch.setattr(RWKVLightningModule, "training_step", poisoned_step)
    proj = tmp_path / "p"
    args = train_args(assets, proj, epoch_count=3)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "error: non-finite loss" in err and "optimizer step 5 (epoch 2)" in err and "Traceback" not in err
    assert newest_epoch(proj) == 1 and not (proj / "adapter-final.safetensors").exists()
    assert_everything_readable(proj)
    state = torch.load(proj / "checkpoints" / "state-epoch000001.ckpt", weights_only=True)
    adapter = load_file(proj / "adapter-epoch1.safetensors")
    assert all(torch.equal(state["state_dict"][f"model.{k}"], v) for k, v in adapter.items())

    monkeypatch.setattr(RWKVLightningModule, "training_step", real_step)  # the cause fixed: resume finishes
    assert train.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert newest_epoch(proj) == 3 and (proj / "adapter-final.safetensors").is_file()
