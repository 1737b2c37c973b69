"""Plumbing of the long-running scripts at tiny sizes: the method-comparison driver (--micro: a random 2 x 128
base, every method fine-tuned for 2 steps by train.py), the GPU check's CPU dry run, its failure reporting and
its CUDA toolkit discovery."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHOD_LABELS = ["LoRA r=16", "PiSSA r=16", "Bone-row b=32", "Bone-col b=32", "Bone-unconstrained b=32",
                 "Bone-Hadamard b=32", "Bone-row b=16", "Bone-row b=64"]


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_compare_methods_micro(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run([sys.executable, "scripts/compare_methods.py", "--micro", "--jobs", "2", "--work", str(tmp_path / "work"),
               "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for name in ("comparison_train_loss.png", "comparison_val_loss.png", "comparison_table.md",
                 "comparison_results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {line.split("|")[1].strip(): line for line in (out / "comparison_table.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert "base, not fine-tuned" in rows
    for label in METHOD_LABELS:
        assert label in rows, (label, list(rows))
        assert "FAILED" not in rows[label]
    results = json.loads((out / "comparison_results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert len(runs) == len(METHOD_LABELS)
    for r in runs.values():
        assert r["train_loss"] and r["val_loss"] and r["total"] == 2 and not r["error"]
    # equal parameters at b = 2r; the unconstrained ablation has two tensors per group
    assert runs["lora"]["params"] == runs["pissa"]["params"] == runs["bone-row"]["params"] == runs["bone-col"]["params"]
    assert runs["bone_unconstrained"]["params"] == 2 * runs["bone-row"]["params"]
    assert runs["bone-row-b64"]["params"] == 2 * runs["bone-row"]["params"] == 4 * runs["bone-row-b16"]["params"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    report = tmp_path / "gpu_check.md"
    res = run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(report)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = report.read_text()
    assert "DRY RUN" in text
    status = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
              if line.startswith("| ") and line.count("|") == 5 and not line.startswith("| section")}
    assert status == {"environment": "ok", "build": "skipped", "compare": "ok", "timing": "ok", "train": "ok",
                      "deepspeed": "ok"}, status
    assert "Sections that ran: environment, compare, timing, train, deepspeed" in text
    for method in ("| lora |", "| bone-row |", "| bone-col |"):
        assert method in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of sections failing without CUDA")
def test_gpu_check_failing_section_is_isolated(tmp_path: Path) -> None:
    """Without --dry-run on a CPU machine the build section fails: it is reported, the next section still runs,
    and the exit status says so."""
    report = tmp_path / "gpu_check.md"
    res = run([sys.executable, "scripts/gpu_check.py", "--sections", "build,environment", "--out", str(report)],
              timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    text = report.read_text()
    status = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
              if line.startswith("| ") and line.count("|") == 5 and not line.startswith("| section")}
    assert status == {"build": "FAILED", "environment": "FAILED"}, status
    assert "RuntimeError: no CUDA device" in text and "Mode: FULL" in text


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake\n")
    (root / "lib64" / "libcudart.so.13").write_text("")
    return root


def test_cuda_home_follows_a_wrapper_nvcc(tmp_path: Path) -> None:
    gpu_check = load_gpu_check()
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert gpu_check.find_cuda_home(str(wrapper), roots=[]) == str(toolkit)  # not tmp_path, the wrapper's root
    assert gpu_check.find_cuda_home(str(toolkit / "bin" / "nvcc"), roots=[]) == str(toolkit)
    assert gpu_check.find_cuda_home(str(wrapper), roots=[tmp_path / "missing"]) == str(toolkit)
    assert gpu_check.find_cuda_home(None, roots=[tmp_path]) is None  # no nvcc and no libcudart there
    env = gpu_check.cuda_build_env({"CUDA_HOME": "/opt/mine", "TORCH_CUDA_ARCH_LIST": "8.9", "PATH": ""})
    assert (env["CUDA_HOME"], env["TORCH_CUDA_ARCH_LIST"]) == ("/opt/mine", "8.9")  # set values are kept
    assert gpu_check.cuda_build_env({"PATH": ""})["TORCH_CUDA_ARCH_LIST"]  # a default when unset


def load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
