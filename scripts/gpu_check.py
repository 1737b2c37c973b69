"""One-command GPU check of the trainer on one CUDA GPU (H100/H200: under 8 minutes), written as a markdown report.

    bash scripts/gpu_check.sh [--out docs/gpu_check.md]      # the real check, needs a CUDA GPU
    bash scripts/gpu_check.sh --dry-run [--out FILE]          # CPU, tiny sizes: keeps the script from rotting

Sections, each in its own subprocess with its own time box (a failing or hanging section is reported and the
others still run):
  environment  torch / CUDA / toolkit / ninja / fla / deepspeed versions and the CUDA build settings used
  build        JIT-build (or load from torch's cache) the CUDA WKV6 kernel in cuda/
  compare      cuda (and fla when importable) against the torch backend: output, final state and every
               gradient, bf16 inputs, relative error <= 1e-2; T not a multiple of 16, B > 1, H > 1, initial state
  timing       fwd+bwd time of every backend at B=8, T=4096, C=2048 and C=4096 (bf16)
  train        20 training steps of a random model with RWKV6-1.6B shapes (24 x 2048, vocab 65536), Bone-row,
               Bone-col and LoRA (b=64, r=32), bf16 autocast, grad_cp 0/1: tokens/s, peak max_memory_allocated
  deepspeed    one DeepSpeed ZeRO stage-2 optimizer step through train.py on a tiny generated checkpoint + data

--dry-run runs every section on the CPU at tiny sizes with the torch backend standing in for cuda/fla (and
Lightning's default strategy standing in for DeepSpeed, which Lightning only runs on CUDA); the CUDA-only build
is reported as skipped. The report says which sections ran. Exit status 0 when no section failed.

CUDA build settings: when unset, CUDA_HOME is pointed at the real toolkit root (the `nvcc` on PATH may be a
wrapper script, and a wrong root fails the link with `cannot find -lcudart`) and TORCH_CUDA_ARCH_LIST at the
GPU's compute capability (nvidia-smi), else "9.0".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from src.atomic import atomic_write_text  # noqa: E402

SECTIONS = ("environment", "build", "compare", "timing", "train", "deepspeed")
CUDA_ONLY = ("build",)  # skipped in --dry-run; every other section has a CPU stand-in
# Per-section time boxes (seconds) for the real run; the whole run is also capped by --budget.
CAPS = {"environment": 60, "build": 240, "compare": 120, "timing": 150, "train": 300, "deepspeed": 180}
DRY_CAPS = {name: 240 for name in SECTIONS}
REL_TOL = 1e-2


@dataclass
class SectionResult:
    status: str  # "ok", "failed", "skipped", "timeout"
    summary: str
    details: str = ""  # markdown
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- CUDA build env
def find_cuda_home(nvcc_on_path: str | None, roots: Sequence[Path] | None = None) -> str | None:
    """The CUDA toolkit root (has bin/nvcc and the cudart library): the first of `roots` (default
    /usr/local/cuda, then the newest /usr/local/cuda-*) that is one, else the toolkit of the `nvcc` on PATH,
    following a wrapper script (`exec /x/bin/nvcc "$@"`) to the real one."""
    if roots is None:
        roots = [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    candidates = list(roots)
    if nvcc_on_path:
        real = Path(nvcc_on_path).resolve()
        candidates.append(real.parent.parent)
        if real.is_file() and real.stat().st_size < 100_000:
            text = real.read_bytes().decode("utf-8", errors="replace")
            candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
    for root in candidates:
        libs = list(root.glob("lib64/libcudart.so*")) + list(root.glob("lib/libcudart.so*")) + \
            list(root.glob("targets/*/lib/libcudart.so*"))
        if (root / "bin" / "nvcc").is_file() and libs:
            return str(root)
    return None


def gpu_compute_capability() -> str | None:
    """"9.0" for an H100/H200, from nvidia-smi; None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=30)
    caps = sorted({line.strip() for line in proc.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())})
    return ";".join(caps) if proc.returncode == 0 and caps else None


def cuda_build_env(environ: Mapping[str, str]) -> dict[str, str]:
    """environ plus defaults for CUDA_HOME and TORCH_CUDA_ARCH_LIST where they are unset."""
    env = dict(environ)
    if not env.get("CUDA_HOME"):
        home = find_cuda_home(shutil.which("nvcc", path=env.get("PATH")))
        if home:
            env["CUDA_HOME"] = home
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = gpu_compute_capability() or "9.0"
    return env


# ----------------------------------------------------------------------------------------------- helpers
def device_of(dry_run: bool) -> str:
    return "cpu" if dry_run else "cuda"


def need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch (use --dry-run on a CPU machine)")


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- sections
def section_environment(dry_run: bool) -> SectionResult:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA build", str(torch.version.cuda)), ("CUDA available", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    cuda_home = os.environ.get("CUDA_HOME", "")
    rows += [("CUDA_HOME", cuda_home or "(unset)"),
             ("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", ""))]
    nvcc = Path(cuda_home) / "bin" / "nvcc" if cuda_home else None
    if nvcc is not None and nvcc.is_file():
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        rows.append(("nvcc", out.strip().splitlines()[-1] if out.strip() else "(no output)"))
    rows.append(("ninja", shutil.which("ninja") or "(not found)"))
    for pkg in ("fla", "deepspeed", "pytorch_lightning"):
        found = importlib.util.find_spec(pkg) is not None
        version = ""
        if found:
            from importlib.metadata import PackageNotFoundError, version as dist_version

            dist = {"fla": "flash-linear-attention", "pytorch_lightning": "pytorch-lightning"}.get(pkg, pkg)
            try:
                version = dist_version(dist)
            except PackageNotFoundError:
                version = "(installed, version unknown)"
        rows.append((pkg, version if found else "(not installed)"))
    details = "| item | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if not dry_run and not torch.cuda.is_available():
        return SectionResult("failed", "no CUDA device: the GPU sections cannot run (use --dry-run on CPU)", details)
    gpu = next((v for k, v in rows if k == "GPU"), "CPU only")
    return SectionResult("ok", f"torch {torch.__version__}, {gpu}", details)


def section_build(dry_run: bool) -> SectionResult:
    import torch

    need_cuda()
    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU build: install a CUDA build of torch to compile the kernel")
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not on PATH: `pip install ninja` (torch's JIT extension build needs it)")
    from src import wkv

    start = time.perf_counter()
    wkv._cuda_ops(64)
    took = time.perf_counter() - start
    return SectionResult("ok", f"WKV6 kernel (head size 64) built or loaded from torch's cache in {took:.1f} s")


def _wkv_inputs(B: int, T: int, H: int, N: int, seed: int, device: str) -> list:
    """r, k, v, w (raw decay in U(-8, 1)), u as bf16 and an fp32 initial state."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.empty(B, T, H, N).uniform_(-8.0, 1.0, generator=g)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g)
    return [x.to(device=device, dtype=torch.bfloat16) for x in (r, k, v, w, u)] + [state.to(device)]


def _outputs_and_grads(backend: str, inputs: list, with_state: bool, gy, gs) -> list:
    """[y, final state, dr, dk, dv, dw, du(, dstate)] of <y, gy> + <state, gs>."""
    import torch

    from src.wkv import wkv6

    leaves = [x.detach().clone().requires_grad_() for x in (inputs if with_state else inputs[:5])]
    state = leaves[5] if with_state else None
    y, s = wkv6(*leaves[:5], state, backend=backend)
    loss = (y.float() * gy.float()).sum() + (s * gs).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [y, s, *grads]


def section_compare(dry_run: bool) -> SectionResult:
    import torch

    from src import wkv

    device = device_of(dry_run)
    if dry_run:
        backends = ["torch"]
        cases = [(2, 67, 3, True), (1, 1, 2, True), (3, 40, 2, False)]
    else:
        need_cuda()
        backends = ["cuda"] + (["fla"] if wkv._fla_importable() else [])
        cases = [(2, 67, 3, True), (1, 1, 2, True), (3, 300, 2, False), (2, 1000, 4, True), (4, 4096, 2, True)]
    names = ["y", "state", "dr", "dk", "dv", "dw", "du", "dstate"]
    lines = ["| backend | B | T | H | initial state | worst tensor | worst rel err | result |",
             "|---|---:|---:|---:|---|---|---:|---|"]
    failures = []
    for backend in backends:
        for B, T, H, with_state in cases:
            inputs = _wkv_inputs(B, T, H, 64, seed=B * 1000 + T, device=device)
            g = torch.Generator().manual_seed(7)
            gy = torch.randn(B, T, H, 64, generator=g).to(device=device, dtype=torch.bfloat16)
            gs = torch.randn(B, H, 64, 64, generator=g).to(device)
            got = _outputs_and_grads(backend, inputs, with_state, gy, gs)
            ref_inputs = [x.float() for x in inputs]
            ref = _outputs_and_grads("torch", ref_inputs, with_state, gy, gs)
            errs = {}
            for name, x, x_ref in zip(names, got, ref, strict=False):  # no dstate without a state
                x64, r64 = x.double(), x_ref.double()
                finite = bool(torch.isfinite(x64).all())
                errs[name] = float((x64 - r64).norm() / r64.norm().clamp(min=1e-30)) if finite else float("inf")
            worst = max(errs, key=errs.__getitem__)
            ok = errs[worst] <= REL_TOL
            if not ok:
                failures.append(f"{backend} B={B} T={T} H={H}: {worst} {errs[worst]:.2e}")
            lines.append(f"| {backend}{' (stand-in)' if dry_run else ''} | {B} | {T} | {H} | {with_state} | {worst} | "
                         f"{errs[worst]:.2e} | {'ok' if ok else 'FAIL'} |")
    details = (f"Reference: the torch backend in fp32 on the same bf16-rounded inputs; tolerance: relative error "
               f"(Frobenius) <= {REL_TOL} for y, the final state and every gradient.\n\n" + "\n".join(lines))
    if failures:
        return SectionResult("failed", f"{len(failures)} case(s) above tolerance: {'; '.join(failures)}", details)
    return SectionResult("ok", f"{', '.join(backends)}: {len(cases)} cases each within rel err {REL_TOL}", details)


def _time_fwd_bwd(backend: str, leaves: list, gy, device: str) -> float:
    """Seconds for one WKV6 forward + backward (gradients cleared afterwards)."""
    from src.wkv import wkv6

    sync(device)
    start = time.perf_counter()
    y, _ = wkv6(*leaves, None, backend=backend)
    y.backward(gy)
    sync(device)
    for leaf in leaves:
        leaf.grad = None
    return time.perf_counter() - start


def section_timing(dry_run: bool) -> SectionResult:
    import torch

    from src import wkv

    device = device_of(dry_run)
    if dry_run:
        backends, shapes, reps = ["torch"], [(1, 64, 128)], 1
    else:
        need_cuda()
        backends = ["cuda"] + (["fla"] if wkv._fla_importable() else []) + ["torch"]
        shapes, reps = [(8, 4096, 2048), (8, 4096, 4096)], 5
    lines = ["| backend | B | T | C (H x 64) | fwd+bwd ms (median) | vs first backend |",
             "|---|---:|---:|---:|---:|---:|"]
    for B, T, C in shapes:
        H = C // 64
        inputs = _wkv_inputs(B, T, H, 64, seed=0, device=device)[:5]
        gy = torch.randn(B, T, H, 64, device=device, dtype=torch.bfloat16)
        first = None
        for backend in backends:
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            _time_fwd_bwd(backend, leaves, gy, device)  # warm-up (and autotuning for fla)
            ms = statistics.median(_time_fwd_bwd(backend, leaves, gy, device) for _ in range(reps)) * 1e3
            first = first or ms
            lines.append(f"| {backend}{' (stand-in)' if dry_run else ''} | {B} | {T} | {C} | {ms:.2f} | "
                         f"{ms / first:.2f}x |")
            del leaves
            if device == "cuda":
                torch.cuda.empty_cache()
    note = ("Anchor (REFERENCE.md): at B=8, T=4096, C=4096 on an H100 the official CUDA kernel takes ~56 ms and "
            "fla's chunk kernel ~54 ms fwd+bwd.")
    return SectionResult("ok", f"timed {', '.join(backends)} at {len(shapes)} shape(s)",
                         note + "\n\n" + "\n".join(lines))


def section_train(dry_run: bool) -> SectionResult:
    bench = importlib.import_module("scripts.bench.train_step")
    if dry_run:
        base = bench.StepSpec(method="lora", grad_cp=False, n_layer=2, n_embd=128, vocab=512, ctx=32, batch=1,
                              steps=2, warmup=0, device="cpu", dtype="fp32", wkv_backend="torch", threads=1)
        timeout = 120.0
    else:
        need_cuda()
        base = bench.StepSpec(method="lora", grad_cp=False, n_layer=24, n_embd=2048, vocab=65536, ctx=1024, batch=8,
                              steps=20, warmup=2, device="cuda", dtype="bf16", wkv_backend="auto")
        timeout = 90.0
    results, failures = [], []
    for cp in (False, True):
        for method in bench.METHODS:
            spec = replace(base, method=method, grad_cp=cp)
            try:
                results.append(bench.measure_in_subprocess(spec, timeout=timeout))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # reported below; the other configs still run
                failures.append(f"{method} grad_cp={int(cp)}: {_last_line(e)}")
    memory = bench.memory_columns(base.device)[-1:]  # the dry run times only: its RSS is the default allocator's
    details = (f"RWKV6 {base.n_layer}x{base.n_embd}, vocab {base.vocab}, batch {base.batch} x ctx {base.ctx}, "
               f"{base.dtype}{' autocast' if base.dtype == 'bf16' else ''}, wkv {base.wkv_backend}, "
               f"b={base.b}, r={base.r}; median of {base.steps} steps after {base.warmup} warm-up; each configuration "
               f"in a fresh process.\n\n" + (bench.ratio_table(results, memory) if results else "(no results)"))
    goals = bench.goal_lines(results, memory[0][0])
    if goals:
        details += "\n\n" + "\n".join(f"- {g}" for g in goals)
    if failures:
        details += "\n\nFailed configurations:\n" + "\n".join(f"- {f}" for f in failures)
        return SectionResult("failed", f"{len(failures)} of 6 configurations failed", details)
    return SectionResult("ok", "; ".join(goals) or "trained every configuration", details)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _tiny_run_assets(folder: Path) -> tuple[Path, Path, Path]:
    """A tiny random x060 checkpoint (2 x 64, World vocabulary) and SFT train/val files."""
    import torch

    from src.checkpoint import save_tensors
    from src.model import RWKV6, RWKV6Config, base_state_dict

    model = RWKV6(RWKV6Config(n_layer=2, n_embd=64, vocab_size=65536, wkv_backend="torch"))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():  # the init zeroes output projections: make every tensor non-trivial
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    ckpt = folder / "tiny.safetensors"
    save_tensors(ckpt, base_state_dict(model))
    rows = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\n#### {a + b}"})
            for a, b in ((2, 3), (4, 5), (6, 7), (8, 9))]
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("\n".join(rows[:2]) + "\n")
    val.write_text("\n".join(rows[2:]) + "\n")
    return ckpt, train, val


def section_deepspeed(dry_run: bool) -> SectionResult:
    if not dry_run:
        need_cuda()
    with tempfile.TemporaryDirectory(prefix="gpu_check_ds_") as tmp:
        folder = Path(tmp)
        ckpt, train, val = _tiny_run_assets(folder)
        proj = folder / "run"
        hw = (["--strategy", "auto", "--accelerator", "cpu", "--precision", "fp32", "--wkv_backend", "torch"] if dry_run
              else ["--strategy", "deepspeed_stage_2", "--devices", "1", "--accelerator", "gpu", "--precision", "bf16",
                    "--wkv_backend", "auto"])
        cmd = [sys.executable, "train.py", "--load_model", str(ckpt), "--data_file", str(train), "--data_type", "sft",
               "--val_file", str(val), "--proj_dir", str(proj), "--peft", "bone", "--bone_b", "32", "--ctx_len", "64",
               "--micro_bsz", "2", "--epoch_count", "1", "--lr_init", "1e-3", "--lr_final", "1e-3", *hw]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=170)
        took = time.perf_counter() - start
        shown = " ".join(cmd[1:]).replace(str(folder), "$TMP")
        details = f"`python {shown}`\n\nexit {proc.returncode} after {took:.1f} s"
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            return SectionResult("failed", f"train.py exited with {proc.returncode}", details + f"\n\n```\n{tail}\n```")
        rows = [json.loads(line) for line in (proj / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        adapter = proj / "adapter-final.safetensors"
        problems = []
        if len(losses) != 1:
            problems.append(f"expected 1 optimizer step, metrics.jsonl has {len(losses)}")
        if not all(map(math.isfinite, losses + vals)):
            problems.append(f"non-finite loss: {losses} / {vals}")
        if not adapter.is_file():
            problems.append("no adapter-final.safetensors")
        details += f"; train loss {losses}, val loss {vals}, adapter written: {adapter.is_file()}"
        what = "Lightning default strategy on CPU (stand-in: Lightning's DeepSpeed needs CUDA)" if dry_run else \
            "DeepSpeed ZeRO stage 2, 1 GPU, bf16"
        if problems:
            return SectionResult("failed", f"{what}: {'; '.join(problems)}", details)
        return SectionResult("ok", f"{what}: 1 step, loss {losses[0]:.3f}, adapter saved", details)


SECTION_FUNCS: dict[str, Callable[[bool], SectionResult]] = {
    "environment": section_environment, "build": section_build, "compare": section_compare,
    "timing": section_timing, "train": section_train, "deepspeed": section_deepspeed,
}


# ----------------------------------------------------------------------------------------------- driver
def run_killable(cmd: list[str], timeout: float, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own process group; on timeout the whole group (the section's own workers
    included) is killed before TimeoutExpired is raised."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_section_subprocess(name: str, dry_run: bool, timeout: float, env: Mapping[str, str]) -> SectionResult:
    """Run one section in a fresh process, time-boxed; a crash or timeout becomes a failed/timeout result."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result_file)]
        if dry_run:
            cmd.append("--dry-run")
        start = time.perf_counter()
        try:
            proc = run_killable(cmd, timeout, env)
        except subprocess.TimeoutExpired as e:
            tail = "\n".join(((e.output or "") + (e.stderr or "")).strip().splitlines()[-15:])
            return SectionResult("timeout", f"did not finish within its {timeout:.0f} s time box",
                                 f"```\n{tail}\n```" if tail else "", time.perf_counter() - start)
        took = time.perf_counter() - start
        if result_file.is_file():
            result = SectionResult(**json.loads(result_file.read_text()))
            result.seconds = took
            return result
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        return SectionResult("failed", f"the section process exited with {proc.returncode} without a result",
                             f"```\n{tail}\n```", took)


def section_main(name: str, dry_run: bool, result_file: Path) -> int:
    """Inside a section's process: run it and write its SectionResult; an exception is the section's failure."""
    try:
        result = SECTION_FUNCS[name](dry_run)
    except Exception as e:  # the section failed: its error is the result (written for the report), not lost
        tb = traceback.format_exc(limit=8)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = SectionResult("failed", f"{type(e).__name__}: {first}",
                               f"```\n{tb.strip()}\n```")
    result_file.write_text(json.dumps(asdict(result)))
    return 0


def render_report(results: dict[str, SectionResult], dry_run: bool, env: Mapping[str, str], total: float) -> str:
    mode = ("DRY RUN: CPU, tiny sizes, the torch backend standing in for cuda/fla, Lightning's default strategy "
            "standing in for DeepSpeed; CUDA-only sections skipped. Numbers here say nothing about GPU speed.") \
        if dry_run else "FULL: one CUDA GPU, real sizes."
    ran = [n for n, r in results.items() if r.status not in ("skipped",)]
    lines = [
        "# GPU check", "",
        f"`bash scripts/gpu_check.sh{' --dry-run' if dry_run else ''}` on {platform.node()}, "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {total:.0f} s in all.", "",
        f"Mode: {mode}", "",
        f"Sections that ran: {', '.join(ran) or 'none'}; CUDA_HOME={env.get('CUDA_HOME', '(unset)')}, "
        f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', '(unset)')}.", "",
        "| section | status | seconds | summary |", "|---|---|---:|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r.status.upper() if r.status in ('failed', 'timeout') else r.status} | "
                     f"{r.seconds:.1f} | {r.summary.replace('|', '/')} |")
    for name, r in results.items():
        if r.details:
            lines += ["", f"## {name}", "", r.details]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, torch backend standing in")
    ap.add_argument("--out", default=None, help="markdown report (default docs/gpu_check.md, "
                                                "docs/gpu_check_dry_run.md with --dry-run)")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for the whole check (each section is also time-boxed); sections left when it runs "
                         "out are skipped")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section is not None:
        return section_main(args.section, args.dry_run, Path(args.result))
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out or ("docs/gpu_check_dry_run.md" if args.dry_run else "docs/gpu_check.md"))
    env = cuda_build_env(os.environ)
    caps = DRY_CAPS if args.dry_run else CAPS
    start = time.perf_counter()
    results: dict[str, SectionResult] = {}
    for name in chosen:
        left = args.budget - (time.perf_counter() - start)
        if args.dry_run and name in CUDA_ONLY:
            results[name] = SectionResult("skipped", "dry run: needs a CUDA GPU and a CUDA build of torch")
        elif left < 15:
            results[name] = SectionResult("skipped", f"the {args.budget:.0f} s budget ran out before this section")
        else:
            results[name] = run_section_subprocess(name, args.dry_run, min(caps[name], left), env)
        r = results[name]
        print(f"[gpu_check] {name}: {r.status} ({r.seconds:.1f} s) {r.summary}", flush=True)
    report = render_report(results, args.dry_run, env, time.perf_counter() - start)
    atomic_write_text(out, report)
    print(f"[gpu_check] report: {out}")
    return 1 if any(r.status in ("failed", "timeout") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
