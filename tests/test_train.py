"""train.py end to end on CPU: outputs, exact resume after a kill, refusals, DDP with 2 processes, LR
schedule, configuration errors and the parameter report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from src.config import load_config
from src.errors import ConfigError
from src.training.optimizer import lr_at
from tests.tiny import tiny_config, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65536  # the World tokenizer's ids need the full vocabulary


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train_assets")
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=VOCAB)
    torch.save(tiny_state_dict(cfg, seed=5), d / "base.pth")
    torch.save(tiny_state_dict(cfg, seed=6), d / "other_base.pth")
    lines = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\n#### {a + b}"})
             for a in range(1, 9) for b in range(1, 5)]
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return {"base": d / "base.pth", "other_base": d / "other_base.pth", "sft": d / "sft.jsonl"}


def common_args(assets: dict[str, Path], proj: Path, **over: object) -> list[str]:
    args = {"load_model": assets["base"], "data_file": assets["sft"], "data_type": "sft", "proj_dir": proj,
            "peft": "bone", "bone_b": 32, "ctx_len": 32, "micro_bsz": 2, "accumulate_grad_batches": 2,
            "epoch_count": 3, "lr_init": 1e-2, "lr_final": 1e-3, "warmup_steps": 1, "accelerator": "cpu",
            "precision": "fp32", "wkv_backend": "torch", "val_fraction": 0.1, "resume": "auto", "seed": 7}
    args.update(over)
    out: list[str] = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


def run_train(args: list[str], timeout: float = 300, **popen: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)  # type: ignore[call-overload]


def kill_when_written(args: list[str], path: Path, timeout: float = 240) -> None:
    """Start train.py with `args`, SIGKILL it as soon as `path` exists, and check that it did."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.exists(), f"{path} was not written before the run ended"


@pytest.mark.slow
def test_end_to_end_then_kill_and_resume_is_exact(assets: dict[str, Path], tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    res = run_train(common_args(assets, straight, wandb="rwkv-bone-test"))  # WANDB_MODE=offline
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("adapter-epoch1.safetensors", "adapter-epoch3.safetensors", "adapter-final.safetensors",
                 "config.yaml", "metrics.jsonl", "loss.png"):
        assert (straight / name).is_file(), name
    assert list((straight / "wandb").glob("offline-run-*")), "wandb offline run not written"
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any("val_loss" in r for r in rows)
    final = load_file(straight / "adapter-final.safetensors")
    assert final and all(k.endswith(".bone") for k in final)
    assert any(t.abs().max() > 0 for t in final.values()), "training did not move the adapter"

    # same run, killed right after the first training state appears, then resumed with the same command
    resumed = tmp_path / "resumed"
    kill_when_written(common_args(assets, resumed), resumed / "checkpoints" / "state-epoch000001.ckpt")
    res = run_train(common_args(assets, resumed))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    again = load_file(resumed / "adapter-final.safetensors")
    assert again.keys() == final.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), f"{k} differs after resume"

    # refusals: other adapter settings, other base model
    res = run_train(common_args(assets, resumed, bone_b=16))
    assert res.returncode == 2 and "refusing to resume" in res.stderr and "bone_b" in res.stderr
    res = run_train(common_args(assets, resumed, load_model=assets["other_base"]))
    assert res.returncode == 2 and "different base model" in res.stderr


def test_samples_at_every_validation_go_to_metrics(assets: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("User: What is 2 plus 3?\\n\\nAssistant:\nUser: Hello\\n\\nAssistant:\n")
    proj = tmp_path / "p"
    res = run_train(common_args(assets, proj, epoch_count=2, sample_prompts=prompts, sample_tokens=8))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (proj / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in rows if "samples" in r]
    assert len(samples) == 2 and [r["epoch"] for r in samples] == [0, 1]
    assert [s["prompt"] for s in samples[0]["samples"]] == ["User: What is 2 plus 3?\n\nAssistant:",
                                                            "User: Hello\n\nAssistant:"]
    assert all(isinstance(s["output"], str) for r in samples for s in r["samples"])
    assert (proj / "adapter-final.safetensors").is_file()


@pytest.mark.slow
def test_state_tuning_end_to_end_with_resume(assets: dict[str, Path], tmp_path: Path) -> None:
    """--peft state through train.py: only the initial states train and are saved; a second run with more epochs
    resumes; the adapter loads with from_checkpoint and changes the output."""
    from src.model import RWKV6

    proj = tmp_path / "state"
    over = {"peft": "state", "lr_init": 1.0, "lr_final": 0.01, "warmup_steps": 2, "val_fraction": 0.0}
    res = run_train(common_args(assets, proj, epoch_count=1, **over))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_train(common_args(assets, proj, epoch_count=2, **over))
    assert res.returncode == 0 and "resuming from" in res.stdout, res.stderr[-3000:]
    adapter = load_file(proj / "adapter-final.safetensors")
    assert set(adapter) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    assert all(t.dtype == torch.float32 and t.abs().max() > 0 for t in adapter.values())
    idx = torch.tensor([[5, 17, 200, 3]])
    with torch.no_grad():
        base = RWKV6.from_checkpoint(assets["base"], wkv_backend="torch")(idx)
        tuned = RWKV6.from_checkpoint(assets["base"], adapter=proj / "adapter-final.safetensors",
                                      wkv_backend="torch")(idx)
    assert (tuned - base).abs().max() > 1e-4


@pytest.mark.slow
def test_mid_epoch_states_resume_bit_identically(assets: dict[str, Path], tmp_path: Path) -> None:
    """--save_every_steps writes states inside an epoch; a run killed right after one resumes from that exact
    sample and ends with the uninterrupted run's adapter, bit for bit, and the same metrics rows."""
    over = {"epoch_count": 2, "save_every_steps": 2, "keep_last": 10, "val_fraction": 0.0}
    straight = tmp_path / "straight"
    res = run_train(common_args(assets, straight, **over))
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert "state-epoch000001-step000000002.ckpt" in names and "state-epoch000002.ckpt" in names, names
    killed = tmp_path / "killed"
    kill_when_written(common_args(assets, killed, **over),
                      killed / "checkpoints" / "state-epoch000001-step000000004.ckpt")
    res = run_train(common_args(assets, killed, **over))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "-step0000" in res.stdout  # a mid-epoch state
    a, b = load_file(straight / "adapter-final.safetensors"), load_file(killed / "adapter-final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in again]


@pytest.mark.slow
def test_resume_applies_a_changed_schedule_and_refuses_a_changed_batch(assets: dict[str, Path], tmp_path: Path) -> None:
    """LambdaLR's state carries the old schedule's settings: a resume with a new lr/epoch count must follow the
    new schedule from the resumed step on (and say so), not silently keep the old one."""
    proj = tmp_path / "p"
    first = run_train(common_args(assets, proj, epoch_count=1, val_fraction=0.0, warmup_steps=0))
    assert first.returncode == 0, first.stderr[-3000:]
    steps = max(json.loads(x)["step"] for x in (proj / "metrics.jsonl").read_text().splitlines())
    refused = run_train(common_args(assets, proj, epoch_count=2, val_fraction=0.0, warmup_steps=0, micro_bsz=1))
    assert refused.returncode == 2 and "micro_bsz: 2 -> 1" in refused.stderr and "Traceback" not in refused.stderr
    res = run_train(common_args(assets, proj, epoch_count=2, val_fraction=0.0, warmup_steps=0, lr_init=5e-3,
                                lr_final=5e-4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "changed schedule" in res.stdout and "lr_init: 0.01 -> 0.005" in res.stdout
    assert "epoch_count: 1 -> 2" in res.stdout
    rows = [json.loads(x) for x in (proj / "metrics.jsonl").read_text().splitlines()]
    later = {r["step"]: r["lr"] for r in rows if "lr" in r and r["step"] > steps}
    assert later
    for step, lr in later.items():  # "lr" is logged before the step's update: the LR of step `step - 1`
        expected = lr_at(step - 1, lr_init=5e-3, lr_final=5e-4, warmup_steps=0, schedule="cosine",
                         total_steps=2 * steps)
        assert lr == pytest.approx(expected, rel=1e-6), (step, lr, expected)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(assets: dict[str, Path], tmp_path: Path) -> None:
    """2 ranks x micro_bsz 1 and 1 rank x micro_bsz 2 see the same samples per optimizer step and the same
    token-weighted loss, so they must end with the same adapter (up to float summation order)."""
    one = run_train(common_args(assets, tmp_path / "one", micro_bsz=2, epoch_count=1, val_fraction=0.0))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(common_args(assets, tmp_path / "two", micro_bsz=1, epoch_count=1, val_fraction=0.0,
                                strategy="ddp", devices=2))
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter-final.safetensors")
    b = load_file(tmp_path / "two" / "adapter-final.safetensors")
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 0 for t in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_inputs_exit_with_a_clear_error(assets: dict[str, Path], tmp_path: Path) -> None:
    res = run_train(common_args(assets, tmp_path / "p", data_file=tmp_path / "missing.jsonl"))
    assert res.returncode == 2 and "missing.jsonl" in res.stderr and "Traceback" not in res.stderr
    res = run_train(common_args(assets, tmp_path / "p", bone_b=48))
    assert res.returncode == 2 and "48" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flag, value", [("ctx_len", "0"), ("micro_bsz", "-1"), ("bone_b", "0"),
                                         ("epoch_count", "0"), ("peft", "dora"), ("strategy", "fsdp")])
def test_invalid_settings_are_refused(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        load_config(["--n_layer", "2", "--n_embd", "64", "--vocab_size", "100", "--peft", "none",
                     "--data_file", "x", f"--{flag}", value])


def test_yaml_config_and_flag_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("peft: lora\nlora_r: 8\nctx_len: 256\n")
    cfg = load_config(["--config", str(path), "--ctx_len", "512", "--load_model", "m.pth", "--data_file", "d"])
    assert (cfg.peft, cfg.lora_r, cfg.ctx_len) == ("lora", 8, 512)
    path.write_text("ctx_lenn: 3\n")
    with pytest.raises(ConfigError, match="ctx_lenn"):
        load_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="sizes come from the checkpoint"):
        load_config(["--load_model", "m.pth", "--n_layer", "3", "--data_file", "d"])


@pytest.mark.parametrize("layers, embd, total",
                         [(24, 2048, 33_030_144), (32, 2560, 55_050_240), (32, 4096, 88_080_384)],
                         ids=["1.6B", "3B", "7B"])
@pytest.mark.parametrize("peft", ["bone", "bone_col", "lora"])
def test_dry_run_parameter_report(capsys: pytest.CaptureFixture[str], layers: int, embd: int, total: int,
                                  peft: str) -> None:
    extra = ["--peft", "bone", "--bone_grouping", "col"] if peft == "bone_col" else ["--peft", peft]
    code = train.main(["--n_layer", str(layers), "--n_embd", str(embd), "--vocab_size", "65536", "--dry_run", "1",
                       "--bone_b", "64", "--lora_r", "32", *extra])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{total:,}" in out.splitlines()[-1]
