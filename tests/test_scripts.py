"""Plumbing of the long-running scripts at tiny sizes, run as modules from the repository root: the
method-comparison driver (--micro: a random 2 x 128 base, every method fine-tuned for 2 steps by train.py), the
GPU check's CPU dry run, its failure reporting, its CUDA toolkit discovery and its checks of a trained adapter and
the paper's Table 7."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.diagnostics.sections import adapter_problems, paper_table7, relative_errors, sft_rows
from src.training.cuda_env import cuda_build_env, find_cuda_home

ROOT = Path(__file__).resolve().parents[1]
METHOD_LABELS = ["LoRA r=16", "PiSSA r=16", "Bone-row b=32", "Bone-col b=32", "Bone-unconstrained b=32",
                 "Bone-Hadamard b=32", "Bone-row b=16", "Bone-row b=64"]


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_compare_methods_micro(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run([sys.executable, "-m", "scripts.compare_methods", "--micro", "--jobs", "2",
               "--work", str(tmp_path / "work"), "--out", str(out)], timeout=600)
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
    assert status == {"environment": "ok", "build": "skipped", "compare": "ok", "deepspeed": "ok", "train": "ok",
                      "timing": "ok", "quant": "ok"}, status
    assert "Sections that ran: environment, compare, deepspeed, train, timing, quant" in text
    for base in ("| bf16 |", "| int8 |", "| nf4 |"):
        assert base in text
    for method in ("| lora |", "| bone-row |", "| bone-col |"):
        assert method in text
    assert "dstate" in text and "Beside the Bone paper's Table 7" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of sections failing without CUDA")
def test_gpu_check_failing_section_is_isolated(tmp_path: Path) -> None:
    """Without --dry-run on a CPU machine the build section fails: it is reported, the next section still runs,
    and the exit status says so."""
    report = tmp_path / "gpu_check.md"
    res = run([sys.executable, "-m", "scripts.gpu_check", "--sections", "build,environment", "--out", str(report)],
              timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    text = report.read_text()
    status = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
              if line.startswith("| ") and line.count("|") == 5 and not line.startswith("| section")}
    assert status == {"environment": "FAILED", "build": "FAILED"}, status
    assert "RuntimeError: no CUDA device" in text and "Mode: FULL" in text


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake\n")
    (root / "lib64" / "libcudart.so.13").write_text("")
    return root


def test_cuda_home_follows_a_wrapper_nvcc(tmp_path: Path) -> None:
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert find_cuda_home(str(wrapper), roots=[]) == str(toolkit)  # not tmp_path, the wrapper's root
    assert find_cuda_home(str(toolkit / "bin" / "nvcc"), roots=[]) == str(toolkit)
    assert find_cuda_home(str(wrapper), roots=[tmp_path / "missing"]) == str(toolkit)
    assert find_cuda_home(None, roots=[tmp_path]) is None  # no nvcc and no libcudart there
    env = cuda_build_env({"CUDA_HOME": "/opt/mine", "TORCH_CUDA_ARCH_LIST": "8.9", "PATH": ""})
    assert (env["CUDA_HOME"], env["TORCH_CUDA_ARCH_LIST"]) == ("/opt/mine", "8.9")  # set values are kept
    assert cuda_build_env({"PATH": ""})["TORCH_CUDA_ARCH_LIST"]  # a default when unset


def test_adapter_check_names_each_problem() -> None:
    good = {"a.bone": torch.full((2, 4, 4), 1e-5), "b.bone": torch.full((1, 4, 4), -2e-5)}
    assert adapter_problems(good, 48) == []
    bad = {"a.bone": torch.zeros(2, 4, 4), "b.bone": torch.full((1, 4, 4), float("nan")).bfloat16()}
    found = " / ".join(adapter_problems(bad, 64))
    for what in ("not fp32", "NaN/Inf", "still zero", "48 values, expected 64"):
        assert what in found, (what, found)


def test_table7_rows_and_ratios() -> None:
    mib = 2**20
    results = [{"method": "lora", "grad_cp": 0, "tokens_per_s": 10000.0, "peak_bytes": 8000 * mib},
               {"method": "bone-row", "grad_cp": 0, "tokens_per_s": 9000.0, "peak_bytes": 8000 * mib},
               {"method": "bone-row", "grad_cp": 1, "tokens_per_s": 6000.0, "peak_bytes": 5000 * mib}]
    text = paper_table7(results, ("peak_bytes", "peak allocated"))
    assert "| lora | 0 | 10,000 | 8,000 | 5,860 | 7,314 |" in text
    assert "| bone-row | 1 | 6,000 | 5,000 | 1,590 | 7,398 |" in text
    assert "0.90x speed at 1.00x memory" in text and "paper: 0.70x speed at 1.68x memory" in text


def test_wkv_comparison_refuses_a_missing_gradient() -> None:
    t = torch.ones(3)
    assert relative_errors({"y": t, "dstate": t}, {"y": t, "dstate": 2 * t}) == {"y": 0.0, "dstate": 0.5}
    with pytest.raises(RuntimeError, match="compared tensors differ"):
        relative_errors({"y": t}, {"y": t, "dstate": t})


def test_sft_rows_fill_the_context() -> None:
    from src.data.jsonl import chat_segments, tokenize_segments
    from src.data.tokenizer import WorldTokenizer

    for record in sft_rows(2, min_tokens=576):
        tokens, mask = tokenize_segments(chat_segments(json.loads(record), "row"), WorldTokenizer())
        assert len(tokens) > 576 and mask.sum() > 500


@pytest.mark.parametrize(("var", "value"), [("PEFT", "lora"), ("QUANT", "fp8")])
def test_demo_refuses_an_unknown_variable_before_doing_anything(tmp_path: Path, var: str, value: str) -> None:
    res = subprocess.run(["bash", "scripts/train_bone.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, var: value, "DEMO_DIR": str(tmp_path / "demo")})
    assert res.returncode == 2 and f"error: {var}={value}" in res.stderr, res.stderr
    assert not (tmp_path / "demo").exists() and "== demo" not in res.stdout
