"""The preflight (src/training/preflight.py): every check on CPU, the GPU-side facts (device count, bf16 support,
the CUDA toolchain, free disk, RAM) simulated by passing MachineFacts; every problem reported at once with its
fix, exit code 2 and no traceback from train.py, before the model is built; --dry_run prints the findings and the
memory estimate; under --wkv_backend auto a failed CUDA kernel build falls back (fla, then torch) up front."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import train
from scripts import common_errors
from src import wkv
from src.config import TrainConfig
from src.errors import ConfigError
from src.rwkv6 import RWKV6Config
from src.training import preflight as pf
from src.training.memory import GiB
from src.training.preflight import GPU, MESSAGES, MachineFacts

A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0), 85_000_000_000)
V100 = GPU("Tesla V100-SXM2-32GB", (7, 0), 34_000_000_000)
T4 = GPU("Tesla T4", (7, 5), 15_800_000_000)
RTX4090 = GPU("NVIDIA GeForce RTX 4090", (8, 9), 25_386_352_640)
GOOD = MachineFacts(gpus=(A100,), torch_version="2.4.1+cu124", torch_cuda="12.4", cuda_home="/usr/local/cuda",
                    nvcc="/usr/local/cuda/bin/nvcc", ninja="/usr/bin/ninja", fla_error="not installed",
                    disk_free=10**13, ram_total=512 * GiB, ram_available=500 * GiB)
CPU_TORCH = MachineFacts(torch_version="2.13.0+cpu", torch_cuda=None, disk_free=10**13, ram_total=512 * GiB,
                         ram_available=500 * GiB)
SIZES = dict(n_layer=24, n_embd=2048, vocab_size=65536)
M16 = RWKV6Config(**SIZES)  # type: ignore[arg-type]


def cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**{**SIZES, "dry_run": True, "micro_bsz": 1, "grad_cp": 1, **kw})  # type: ignore[arg-type]


def codes(findings: list[pf.Finding]) -> list[str]:
    return [f.code for f in findings]


@pytest.mark.parametrize("settings", [{"strategy": "deepspeed_stage_2"}, {"accelerator": "gpu"}])
def test_a_gpu_strategy_without_cuda_names_the_cause_and_the_cpu_fallback(settings: dict) -> None:
    [problem] = pf.check_hardware(cfg(**settings), CPU_TORCH)
    assert problem.code == "no_cuda" and problem.severity == "error"
    assert "CPU build" in problem.text and "--strategy auto --accelerator cpu" in problem.fix
    hidden = dataclasses.replace(CPU_TORCH, torch_cuda="12.4", cuda_visible_devices="")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in pf.check_hardware(cfg(**settings), hidden)[0].text
    no_driver = dataclasses.replace(CPU_TORCH, torch_cuda="12.4")
    assert "driver" in pf.check_hardware(cfg(**settings), no_driver)[0].text
    assert pf.check_hardware(cfg(accelerator="cpu"), CPU_TORCH) == []  # CPU training needs no GPU


def test_more_devices_than_visible_gpus() -> None:
    facts = dataclasses.replace(GOOD, gpus=(A100, A100), cuda_visible_devices="0,1")
    [problem] = pf.check_hardware(cfg(devices=4, strategy="deepspeed_stage_2"), facts)
    assert problem.code == "too_many_devices" and "--devices 4" in problem.text and "2 are visible" in problem.text
    assert "`--devices 2`" in problem.fix and "CUDA_VISIBLE_DEVICES=0,1" in problem.text
    assert pf.check_hardware(cfg(devices=2), facts) == []


@pytest.mark.parametrize("gpu", [V100, T4], ids=["V100", "T4"])
def test_bf16_on_a_gpu_without_bf16_suggests_fp16(gpu: GPU) -> None:
    [problem] = pf.check_hardware(cfg(precision="bf16"), dataclasses.replace(GOOD, gpus=(gpu,)))
    assert problem.code == "no_bf16" and gpu.name in problem.text and "--precision fp16" in problem.fix
    assert pf.check_hardware(cfg(precision="fp16"), dataclasses.replace(GOOD, gpus=(gpu,))) == []
    assert pf.check_hardware(cfg(precision="bf16"), GOOD) == []


@pytest.mark.parametrize("missing, words", [
    ({"nvcc": None, "cuda_home": None, "cuda_home_found": "/usr/local/cuda-12.4"},
     ["nvcc", "export CUDA_HOME=/usr/local/cuda-12.4"]),
    ({"cuda_home": None, "cuda_home_found": "/opt/cuda"}, ["CUDA_HOME is unset", "export CUDA_HOME=/opt/cuda"]),
    ({"torch_cuda": None}, ["CPU build", "CUDA build of torch"]),
    ({"ninja": None}, ["ninja", "pip install ninja"]),
    ({"arch_list": "9.0"}, ["TORCH_CUDA_ARCH_LIST='9.0' does not include 8.0", 'TORCH_CUDA_ARCH_LIST="8.0"']),
])
def test_wkv_cuda_names_what_is_missing_from_the_toolchain(missing: dict, words: list[str]) -> None:
    facts = dataclasses.replace(GOOD, **missing)
    [problem], backend = pf.check_wkv(cfg(wkv_backend="cuda"), facts, 64, build=False)
    assert problem.code == "wkv_cuda" and problem.severity == "error" and backend == "cuda"
    assert "WKV backend 'cuda' is not available" in problem.text
    for word in words:
        assert word in problem.text + problem.fix, (word, problem)
    # under auto the same is one warning naming the cause, and the run falls back (fla first, then torch)
    [warning], backend = pf.check_wkv(cfg(wkv_backend="auto"), facts, 64, build=False)
    assert warning.code == "wkv_fallback" and warning.severity == "warning" and backend == "torch"
    assert words[0] in warning.text
    _, backend = pf.check_wkv(cfg(wkv_backend="auto"), dataclasses.replace(facts, fla_error=None), 64, build=False)
    assert backend == "fla"


def test_a_complete_toolchain_keeps_cuda_and_gpu_only_backends_on_the_cpu_are_errors() -> None:
    assert pf.check_wkv(cfg(wkv_backend="cuda"), GOOD, 64, build=False) == ([], "cuda")
    assert pf.check_wkv(cfg(wkv_backend="auto"), GOOD, 64, build=False) == ([], "cuda")
    assert pf.check_wkv(cfg(wkv_backend="auto", accelerator="cpu"), CPU_TORCH, 64, build=False) == ([], "torch")
    for backend in ("cuda", "fla"):
        [problem], _ = pf.check_wkv(cfg(wkv_backend=backend, accelerator="cpu"), CPU_TORCH, 64, build=False)
        assert problem.code == "wkv_cpu" and "--wkv_backend torch" in problem.fix
    [problem], _ = pf.check_wkv(cfg(wkv_backend="fla"), GOOD, 64, build=False)
    assert problem.code == "wkv_fla" and "not installed" in problem.text


def test_a_failed_kernel_build_falls_back_under_auto_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toolchain looks complete but the JIT build fails: the preflight builds up front, auto falls back with
    one warning naming the cause, and wkv's own auto resolution no longer picks cuda (never mid-run)."""
    calls = []

    def failing_build(head_size: int) -> None:
        calls.append(head_size)
        raise RuntimeError("Error building extension 'rwkv6bone_wkv6_h64':\nnvcc fatal : Unsupported gpu architecture")

    monkeypatch.setattr(wkv, "_cuda_build_failure", None)
    monkeypatch.setattr(wkv, "_cuda_kernel_buildable", lambda: True)
    monkeypatch.setattr(wkv, "_cuda_ops", failing_build)
    assert wkv.resolve_backend("auto", "cuda") == "cuda"  # before the attempt, auto would pick the kernel
    [warning], backend = pf.check_wkv(cfg(wkv_backend="auto"), GOOD, 64, build=True)
    assert calls == [64] and backend == "torch" and warning.severity == "warning"
    assert "Unsupported gpu architecture" in warning.text and "gpu_check.sh" in warning.fix
    assert wkv.resolve_backend("auto", "cuda") == "torch"  # recorded: auto resolves to the fallback from now on
    with pytest.raises(ConfigError, match="building the kernel failed"):
        wkv.resolve_backend("cuda", "cuda")
    [error], _ = pf.check_wkv(cfg(wkv_backend="cuda"), GOOD, 64, build=True)
    assert error.severity == "error" and calls == [64]  # the failure is remembered, not rebuilt


def test_disk_space_against_the_states_and_adapters_the_run_keeps() -> None:
    c = cfg(keep_last=2, epoch_count=3, epoch_save=1)
    need, what = pf.run_files_bytes(c, M16)
    P = 33_030_144
    assert need == 3 * P * 12 + 4 * P * 4 + 16 * 2**20  # 3 states (trainable + 2 moments) and 4 adapter files
    assert "3 training states" in what and "4 adapter files" in what
    ds_need, _ = pf.run_files_bytes(cfg(keep_last=2, epoch_count=3, strategy="deepspeed_stage_2"), M16)
    assert ds_need == 3 * P * (2 + 12) + 4 * P * 4 + 16 * 2**20  # + the fp32 master (and the bf16 module copy)
    [problem] = pf.check_disk(c, M16, dataclasses.replace(GOOD, disk_free=100 * 2**20))
    assert problem.code == "disk" and "--keep_last 1" in problem.fix and "0.10 GiB free" in problem.text
    assert pf.check_disk(c, M16, GOOD) == []


def test_host_ram_against_loading_and_offloaded_states() -> None:
    m7 = RWKV6Config(n_layer=32, n_embd=4096, vocab_size=65536, d_mix=64, d_decay=128)
    c = cfg(strategy="deepspeed_stage_2_offload", devices=4)
    est = pf.estimate_memory(m7, c, on_gpu=True, checkpoint_bytes=15 * GiB)
    assert est.host_rows["loading"] > 4 * 15 * GiB  # every rank of the machine reads the checkpoint
    facts = dataclasses.replace(GOOD, gpus=(A100,) * 4, ram_total=64 * GiB, ram_available=60 * GiB)
    [problem] = pf.check_memory(c, est, facts, on_gpu=True)
    assert problem.code == "ram" and problem.severity == "error" and "offload" in problem.fix
    tight = dataclasses.replace(facts, ram_total=1024 * GiB, ram_available=64 * GiB)
    [warning] = pf.check_memory(c, est, tight, on_gpu=True)
    assert warning.severity == "warning" and "available now" in warning.text
    assert pf.check_memory(c, est, dataclasses.replace(facts, ram_total=1024 * GiB, ram_available=1000 * GiB),
                           on_gpu=True) == []


def test_a_peak_beyond_the_gpu_is_a_warning_with_the_memory_flags() -> None:
    c = cfg(grad_cp=0, micro_bsz=2, ctx_len=4096)
    est = pf.estimate_memory(M16, c, on_gpu=True)
    assert 30 * GiB < est.device_total < 80e9
    [warning] = pf.check_memory(c, est, dataclasses.replace(GOOD, gpus=(RTX4090,)), on_gpu=True)
    assert warning.code == "gpu_memory" and warning.severity == "warning"
    assert "RTX 4090" in warning.text and "--grad_cp 1" in warning.fix and "--head_chunk" in warning.fix
    assert pf.check_memory(c, est, GOOD, on_gpu=True) == []  # fits an 80 GB card


def test_every_problem_at_once(tmp_path: Path) -> None:
    facts = dataclasses.replace(GOOD, gpus=(V100,), ninja=None, disk_free=1000, ram_total=8 * GiB, ram_available=GiB)
    report = pf.preflight(cfg(devices=2, strategy="deepspeed_stage_2", wkv_backend="cuda", proj_dir=str(tmp_path)),
                          facts, build=False)
    assert set(codes(report.findings)) == {"too_many_devices", "no_bf16", "wkv_cuda", "disk", "ram"}
    with pytest.raises(ConfigError) as err:
        report.raise_errors()
    message = str(err.value)
    assert message.startswith(f"the preflight found {len(report.errors)} problems")
    assert message.count("Fix:") == len(report.errors) and "pip install ninja" in message


def test_train_py_reports_every_problem_before_building_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One V100 (no bf16), --devices 2, the CUDA kernel without ninja, a full disk: train.py names all four with
    their fixes, exit 2, no traceback, and builds no model."""
    def never(_cfg: TrainConfig) -> None:
        raise AssertionError("the model was built before the preflight stopped the run")

    facts = dataclasses.replace(GOOD, gpus=(V100,), ninja=None, disk_free=1000)
    seen = []
    monkeypatch.setattr(train, "gather_facts", lambda env, proj: seen.append(env) or facts)
    monkeypatch.setattr(train, "build_model", never)
    args = [*[f"--{k}={v}" for k, v in SIZES.items()], "--peft", "none", "--data_file", str(tmp_path / "no.jsonl"),
            "--devices", "2", "--precision", "bf16", "--wkv_backend", "cuda", "--proj_dir", str(tmp_path / "p")]
    code = train.main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and seen and "PATH" in seen[0]  # train.py passes os.environ
    assert "the preflight found 4 problems" in err and err.count("Fix:") == 4
    for words in ("--devices 2 asks for 2 GPUs", "--precision fp16", "pip install ninja", "--keep_last 1"):
        assert words in err, words


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_train_py_on_a_cpu_machine_with_a_gpu_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """This machine's real GPU facts (none), with room on disk and in RAM (a CI runner may have less than the
    1.6B sizes' checkpoints need, which is another finding, tested above)."""
    def roomy(environ: dict[str, str], proj_dir: str) -> MachineFacts:
        real = pf.gather_facts(environ, proj_dir)
        return dataclasses.replace(real, disk_free=10**13, ram_total=512 * GiB, ram_available=500 * GiB)

    monkeypatch.setattr(train, "gather_facts", roomy)
    code = train.main([*[f"--{k}={v}" for k, v in SIZES.items()], "--peft", "none", "--data_file",
                       str(tmp_path / "no.jsonl"), "--strategy", "deepspeed_stage_2", "--wkv_backend", "fla",
                       "--proj_dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("Fix:") == 1
    assert "needs a CUDA GPU" in err and "--strategy auto --accelerator cpu" in err


def test_dry_run_prints_findings_and_the_memory_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main([*[f"--{k}={v}" for k, v in SIZES.items()], "--dry_run", "--strategy", "deepspeed_stage_2",
                       "--grad_cp", "1", "--micro_bsz", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "preflight findings" in out and "needs a CUDA GPU" in out  # a finding, not a failure
    assert "memory estimate per GPU" in out and "peak allocated" in out and "framework buffers" in out
    assert "33,030,144" in out.splitlines()[-1]  # the parameter table still ends the report


def test_facts_come_from_the_given_environment(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "TORCH_CUDA_ARCH_LIST": "8.9"}
    facts = pf.gather_facts(env, tmp_path / "not" / "yet")
    assert facts.cuda_visible_devices == "" and facts.arch_list == "8.9" and facts.ninja is None
    assert facts.disk_path == str(tmp_path) and facts.disk_free and facts.disk_free > 0
    assert facts.ram_total and facts.ram_available and facts.ram_total >= facts.ram_available


def test_library_code_reads_the_environment_only_in_gather_facts() -> None:
    root = Path(__file__).resolve().parents[2] / "src" / "training"
    for name in ("preflight.py", "memory.py", "cuda_env.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                raise AssertionError(f"{name} reads the environment directly (line {node.lineno})")


def test_common_errors_markdown_has_every_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert common_errors.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("## Common errors and their fixes")
    for message in MESSAGES.values():
        assert f"**{message.title}**" in out
    assert out.count("Fix: ") == len(MESSAGES) and "{" not in out  # every template filled
