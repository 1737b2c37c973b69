"""The mode every GPU preset runs, emulated on CPU: `train.py` with a preset's settings (Bone-row, bf16,
DeepSpeed ZeRO-2 or ZeRO-3, no autocast, two ranks) on a tiny model, against an fp32 single-process reference
of the same run: loss, gradients and the saved adapter agree within bf16 tolerances, and the adapter file holds
the fp32 master values.

Each run is a subprocess (`python -m tests.training.test_preset_bf16 MODE OUT`): DeepSpeed keeps global state and
Lightning launches the second rank by re-running the command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "rwkv6-1.6b-4x4090.yaml"
VOCAB = 65536  # the World tokenizer's ids need the full vocabulary
WORLD = 2
WORKER_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------- worker side
def _assets(out: Path) -> dict[str, Path]:
    from tests.tiny import tiny_config, tiny_state_dict

    base, data = out / "base.pth", out / "sft.jsonl"
    if not base.exists():
        cfg = tiny_config(n_layer=2, n_embd=128, vocab_size=VOCAB)
        torch.save(tiny_state_dict(cfg, seed=11, dtype=torch.bfloat16), base)
        lines = [json.dumps({"prompt": f"What is {a} times {b}?", "response": f"{a} * {b} = {a * b}.\n#### {a * b}"})
                 for a in range(2, 10) for b in range(2, 6)]
        data.write_text("\n".join(lines) + "\n")
    return {"base": base, "data": data}


def preset_args(out: Path, proj: Path, **over: Any) -> list[str]:
    """The 1.6B preset, scaled to the tiny model and this CPU: only sizes, lengths and devices change."""
    preset = yaml.safe_load(PRESET.read_text())
    assets = _assets(out)
    settings = {**preset, "load_model": str(assets["base"]), "data_file": str(assets["data"]), "proj_dir": str(proj),
                "bone_b": 32, "ctx_len": 48, "micro_bsz": 2, "accumulate_grad_batches": 2, "devices": WORLD,
                "accelerator": "cpu", "epoch_count": 1, "lr_init": 1e-3, "lr_final": 1e-3, "val_fraction": 0.2,
                "wkv_backend": "torch", "seed": 3, **over}
    (proj.parent / f"{proj.name}.yaml").write_text(yaml.safe_dump(settings))
    return ["--config", str(proj.parent / f"{proj.name}.yaml")]


def _capture_first_step(proj: Path) -> None:
    """Instrument the real module: at the first optimizer step write the full accumulated fp32 gradient of every
    trainable tensor (DeepSpeed: `safe_get_full_grad`, a collective) and the dtypes the step ran in."""
    from src.training.module import RWKVLightningModule

    def on_before_optimizer_step(self: RWKVLightningModule, optimizer: Any) -> None:
        if self.trainer.global_step != 0:
            return
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        grads = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                if engine is not None:
                    from deepspeed.utils import safe_get_full_grad

                    g = safe_get_full_grad(p)
                else:
                    g = p.grad
                if g is None:
                    return  # not the accumulation boundary yet
                grads[name] = g.detach().float().cpu()
        if self.trainer.is_global_zero:
            save_file(grads, str(proj / "grads-step1.safetensors"))
            bone = next(p for n, p in self.model.named_parameters() if n.endswith(".bone"))
            info = {"bone_dtype": str(bone.dtype), "base_dtype": str(self.model.emb.weight.dtype),
                    "data_types": [str(t) for t in engine.get_data_types()] if engine is not None else None}
            (proj / "step1.json").write_text(json.dumps(info))

    def training_step(self: RWKVLightningModule, batch: Any, batch_idx: int) -> Any:
        if torch.is_autocast_enabled("cpu") and self.trainer.is_global_zero:
            (proj / "autocast_seen").write_text("1")
        return original_step(self, batch, batch_idx)

    original_step = RWKVLightningModule.training_step
    RWKVLightningModule.on_before_optimizer_step = on_before_optimizer_step  # type: ignore[method-assign]
    RWKVLightningModule.training_step = training_step  # type: ignore[method-assign]


def _count_gathers(proj: Path) -> None:
    """Record how many parameter elements anything gathers whole through deepspeed.zero.GatheredParameters."""
    import deepspeed

    original = deepspeed.zero.GatheredParameters
    record = proj / "gathered.json"
    record.write_text("0")

    def counting(params: Any, *args: Any, **kwargs: Any) -> Any:
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in params if p is not None)
        record.write_text(str(int(record.read_text()) + n))
        return original(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = counting


def worker(mode: str, out: Path) -> None:
    import train
    from tests.cpu_deepspeed import use_cpu_deepspeed

    torch.set_num_threads(1)
    proj = out / mode
    proj.mkdir(parents=True, exist_ok=True)
    _capture_first_step(proj)
    if mode == "reference":  # fp32, one process, same global batch and the same samples per step
        args = preset_args(out, proj, strategy="auto", precision="fp32", devices=1,
                           accumulate_grad_batches=2 * WORLD)
    else:
        use_cpu_deepspeed()
        _count_gathers(proj)
        args = preset_args(out, proj, strategy=mode)
    code = train.main(args)
    if code != 0:
        raise SystemExit(code)


# ----------------------------------------------------------------------------------------------- pytest side
def _run_worker(mode: str, out: Path) -> Path:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.training.test_preset_bf16", mode, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out / mode


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("preset")
    return {mode: _run_worker(mode, out) for mode in ("reference", "deepspeed_stage_2", "deepspeed_stage_3")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _val_loss(proj: Path) -> float:
    rows = [json.loads(line) for line in (proj / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_preset_mode_runs_in_bf16_without_autocast_with_fp32_accumulation(runs: dict[str, Path], mode: str) -> None:
    info = json.loads((runs[mode] / "step1.json").read_text())
    assert info == {"bone_dtype": "torch.bfloat16", "base_dtype": "torch.bfloat16",
                    "data_types": ["torch.bfloat16", "torch.float32"]}
    assert not (runs[mode] / "autocast_seen").exists()
    ref = json.loads((runs["reference"] / "step1.json").read_text())
    assert ref["bone_dtype"] == "torch.float32" and ref["data_types"] is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_preset_gradients_match_fp32_reference(runs: dict[str, Path], mode: str) -> None:
    """The first optimizer step's accumulated gradient over 2 ranks x 2 micro-batches (token-weighted mean
    of the window) against the fp32 single-process run's over 4 micro-batches."""
    ref = load_file(runs["reference"] / "grads-step1.safetensors")
    got = load_file(runs[mode] / "grads-step1.safetensors")
    assert got.keys() == ref.keys() and len(ref) == 2 * 8
    errors = {k: _rel(got[k], ref[k]) for k in ref}
    assert all(ref[k].abs().max() > 0 for k in ref)
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.slow
def test_zero3_export_gathers_no_whole_model(runs: dict[str, Path]) -> None:
    """The adapter export reads the fp32 master copy one trainable tensor at a time; it never gathers the
    (frozen) base, which a 14B model could not fit on one 24 GB card."""
    assert int((runs["deepspeed_stage_3"] / "gathered.json").read_text()) == 0
    assert (runs["deepspeed_stage_3"] / "adapter-epoch1.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_preset_adapter_is_fp32_master_and_matches_reference(runs: dict[str, Path], mode: str) -> None:
    path = runs[mode] / "adapter-final.safetensors"
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    got, ref = load_file(path), load_file(runs["reference"] / "adapter-final.safetensors")
    assert got.keys() == ref.keys()
    # written from the optimizer's fp32 master copy, not from the bf16 module copy
    assert any(not torch.equal(t, t.bfloat16().float()) for t in got.values())
    # 8 AdamW steps at lr 1e-3 from zero: entries whose gradient is below bf16 noise may take the other sign
    assert max(_rel(got[k], ref[k]) for k in ref) < 0.1
    assert abs(_val_loss(runs[mode]) - _val_loss(runs["reference"])) < 5e-3 * _val_loss(runs["reference"])


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
