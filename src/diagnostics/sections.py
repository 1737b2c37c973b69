"""The GPU check's sections. Each takes a `CheckContext` and returns a `SectionResult` (an exception is the
section's failure, reported by the driver in src/diagnostics/gpu_check.py, which runs every section in a
process of its own).

  environment  torch / CUDA / toolkit / ninja / fla / deepspeed versions and the CUDA build settings used
  build        JIT-build (or load from torch's cache) the CUDA WKV6 kernel in cuda/
  compare      cuda (and fla when importable) against the torch backend in fp32 on fp32 copies of the same
               bf16-rounded inputs: y, the final state and every gradient (r, k, v, w, u and the initial state)
  deepspeed    the 1.6B preset mode through train.py: one DeepSpeed ZeRO-2 bf16 Bone-row optimizer step at
               RWKV6-1.6B shapes (random bf16 checkpoint under the official key names), fp32 finite adapter file;
               its torch.cuda.max_memory_allocated beside the memory estimate (src/training/memory.py)
  train        tokens/s and peak memory of LoRA, Bone-row and Bone-col at the Bone paper's Table 7 setting
               (RWKV6-1.6B shapes, ctx 512, batch 1; grad_cp 0 and 1), beside the paper's own numbers and the
               memory estimate of each configuration
  timing       fwd+bwd time of every WKV backend at B=8, T=4096, C=2048 and C=4096 (bf16)
  quant        Bone-row steps on a bf16 / int8 / nf4 base at RWKV6-7B widths (4 layers), ctx 1024, grad_cp: step
               time and torch.cuda.max_memory_allocated beside the memory estimate

With `dry_run` every section runs on the CPU at tiny sizes, the torch backend standing in for cuda/fla and
Lightning's default strategy for DeepSpeed (Lightning runs DeepSpeed only on CUDA); `build` needs CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from src.diagnostics.processes import function_command, last_lines, run_killable

REL_TOL = 1e-2  # relative (Frobenius) error of the bf16 backends against the fp32 reference
PRESET = "configs/rwkv6-1.6b-4x4090.yaml"  # the preset the deepspeed section trains with
RWKV6_1B6 = {"n_layer": 24, "n_embd": 2048, "vocab_size": 65536}
# The Bone paper's Table 7 (its implementation, RWKV-PEFT, on one RTX 4090; RWKV6-1.6B, batch 1, ctx 512):
# (method, grad_cp) -> (tokens/s, GPU memory MB). "Bone" there is the row grouping; its "model checkpoint" row
# is whole-model gradient checkpointing (our grad_cp 1). LoRA with grad_cp 1 is not in the table.
PAPER_TABLE7 = {("lora", 0): (5860.0, 7314.0), ("bone-row", 0): (4110.0, 12276.0), ("bone-row", 1): (1590.0, 7398.0)}


@dataclass
class SectionResult:
    status: str  # "ok", "failed", "skipped", "timeout"
    summary: str
    details: str = ""  # markdown
    seconds: float = 0.0


@dataclass(frozen=True)
class CheckContext:
    """What a section may depend on: the mode, the environment (CUDA build settings included) for anything it
    starts, and the Python that runs the project."""

    dry_run: bool
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


def need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch (use --dry-run on a CPU machine)")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- environment
def section_environment(ctx: CheckContext) -> SectionResult:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA build", str(torch.version.cuda)), ("CUDA available", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    cuda_home = ctx.env.get("CUDA_HOME", "")
    rows += [("CUDA_HOME", cuda_home or "(unset)"), ("TORCH_CUDA_ARCH_LIST", ctx.env.get("TORCH_CUDA_ARCH_LIST", ""))]
    nvcc = Path(cuda_home) / "bin" / "nvcc" if cuda_home else None
    if nvcc is not None and nvcc.is_file():
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        rows.append(("nvcc", out.strip().splitlines()[-1] if out.strip() else "(no output)"))
    rows.append(("ninja", shutil.which("ninja", path=ctx.env.get("PATH")) or "(not found)"))
    for pkg, dist in (("fla", "flash-linear-attention"), ("deepspeed", "deepspeed"),
                      ("pytorch_lightning", "pytorch-lightning")):
        rows.append((pkg, _installed_version(pkg, dist)))
    details = "| item | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if not ctx.dry_run and not torch.cuda.is_available():
        return SectionResult("failed", "no CUDA device: the GPU sections cannot run (use --dry-run on CPU)", details)
    gpu = next((v for k, v in rows if k == "GPU"), "CPU only")
    return SectionResult("ok", f"torch {torch.__version__}, {gpu}", details)


def _installed_version(module: str, dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec(module) is None:
        return "(not installed)"
    try:
        return version(dist)
    except PackageNotFoundError:
        return "(installed, version unknown)"


# ----------------------------------------------------------------------------------------------- build
def section_build(ctx: CheckContext) -> SectionResult:
    import torch

    need_cuda()
    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU build: install a CUDA build of torch to compile the kernel")
    if shutil.which("ninja", path=ctx.env.get("PATH")) is None:
        raise RuntimeError("ninja is not on PATH: `pip install ninja` (torch's JIT extension build needs it)")
    from src import wkv

    start = time.perf_counter()
    wkv._cuda_ops(64)
    took = time.perf_counter() - start
    return SectionResult("ok", f"WKV6 kernel (head size 64) built or loaded from torch's cache in {took:.1f} s")


# ----------------------------------------------------------------------------------------------- compare
def wkv_inputs(B: int, T: int, H: int, N: int, seed: int, device: str, with_state: bool = True) -> list[Any]:
    """r, k, v, w (raw decay in U(-8, 1)), u rounded to bf16, plus an fp32 initial state when `with_state`
    (the kernels keep the state in fp32)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.empty(B, T, H, N).uniform_(-8.0, 1.0, generator=g)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g)
    out = [x.to(device=device, dtype=torch.bfloat16) for x in (r, k, v, w, u)]
    return out + [state.to(device)] if with_state else out


def outputs_and_grads(backend: str, inputs: list[Any], gy: Any, gs: Any) -> dict[str, Any]:
    """{y, state, dr, dk, dv, dw, du(, dstate)}: the outputs and the gradients of <y, gy> + <state, gs> with
    respect to every input (dstate when `inputs` holds an initial state)."""
    import torch

    from src.wkv import wkv6

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, s = wkv6(*leaves[:5], leaves[5] if len(leaves) == 6 else None, backend=backend)
    loss = (y.float() * gy.float()).sum() + (s.float() * gs).sum()
    grads = torch.autograd.grad(loss, leaves)
    names = ["dr", "dk", "dv", "dw", "du", "dstate"][: len(leaves)]
    return {"y": y, "state": s, **dict(zip(names, grads, strict=True))}


def relative_errors(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Relative Frobenius error of every tensor of `got` against `ref` (inf when not finite); both must name the
    same tensors."""
    import torch

    if got.keys() != ref.keys():
        raise RuntimeError(f"compared tensors differ: {sorted(got)} vs {sorted(ref)}")
    errs = {}
    for name, x in got.items():
        x64, r64 = x.double(), ref[name].double()
        finite = bool(torch.isfinite(x64).all())
        errs[name] = float((x64 - r64).norm() / r64.norm().clamp(min=1e-30)) if finite else float("inf")
    return errs


def section_compare(ctx: CheckContext) -> SectionResult:
    import torch

    from src import wkv

    if ctx.dry_run:
        backends = ["torch"]
        cases = [(2, 67, 3, True), (1, 1, 2, True), (3, 40, 2, False)]
    else:
        need_cuda()
        backends = ["cuda"] + (["fla"] if wkv._fla_importable() else [])
        cases = [(2, 67, 3, True), (1, 1, 2, True), (3, 300, 2, False), (2, 1000, 4, True), (4, 4096, 2, True)]
    lines = ["| backend | B | T | H | initial state | worst tensor | worst rel err | every tensor's rel err | result |",
             "|---|---:|---:|---:|---|---|---:|---|---|"]
    failures = []
    for backend in backends:
        for B, T, H, with_state in cases:
            inputs = wkv_inputs(B, T, H, 64, seed=B * 1000 + T, device=ctx.device, with_state=with_state)
            g = torch.Generator().manual_seed(7)
            gy = torch.randn(B, T, H, 64, generator=g).to(device=ctx.device, dtype=torch.bfloat16)
            gs = torch.randn(B, H, 64, 64, generator=g).to(ctx.device)
            got = outputs_and_grads(backend, inputs, gy, gs)
            reference = [x.detach().float() for x in inputs]  # fp32 copies of the same bf16-rounded values
            ref = outputs_and_grads("torch", reference, gy, gs)
            errs = relative_errors(got, ref)
            worst = max(errs, key=errs.__getitem__)
            ok = errs[worst] <= REL_TOL
            if not ok:
                failures.append(f"{backend} B={B} T={T} H={H}: {worst} {errs[worst]:.2e}")
            every = ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
            lines.append(f"| {backend}{' (stand-in)' if ctx.dry_run else ''} | {B} | {T} | {H} | {with_state} | "
                         f"{worst} | {errs[worst]:.2e} | {every} | {'ok' if ok else 'FAIL'} |")
    details = (f"Reference: the torch backend in fp32 on fp32 copies of the same bf16-rounded inputs (the initial "
               f"state is fp32 for both); tolerance: relative error (Frobenius) <= {REL_TOL} for y, the final state "
               f"and the gradients of r, k, v, w, u and, where given, the initial state.\n\n" + "\n".join(lines))
    if failures:
        return SectionResult("failed", f"{len(failures)} case(s) above tolerance: {'; '.join(failures)}", details)
    return SectionResult("ok", f"{', '.join(backends)}: {len(cases)} cases each, every tensor within rel err "
                               f"{REL_TOL}", details)


# ----------------------------------------------------------------------------------------------- timing
def _time_fwd_bwd(backend: str, leaves: list[Any], gy: Any, device: str) -> float:
    """Seconds for one WKV6 forward + backward (gradients cleared afterwards)."""
    from src.wkv import wkv6

    _sync(device)
    start = time.perf_counter()
    y, _ = wkv6(*leaves, None, backend=backend)
    y.backward(gy)
    _sync(device)
    for leaf in leaves:
        leaf.grad = None
    return time.perf_counter() - start


def section_timing(ctx: CheckContext) -> SectionResult:
    import torch

    from src import wkv

    if ctx.dry_run:
        backends, shapes, reps = ["torch"], [(1, 64, 128)], 1
    else:
        need_cuda()
        backends = ["cuda"] + (["fla"] if wkv._fla_importable() else []) + ["torch"]
        shapes, reps = [(8, 4096, 2048), (8, 4096, 4096)], 5
    lines = ["| backend | B | T | C (H x 64) | fwd+bwd ms (median) | vs first backend |",
             "|---|---:|---:|---:|---:|---:|"]
    for B, T, C in shapes:
        H = C // 64
        inputs = wkv_inputs(B, T, H, 64, seed=0, device=ctx.device, with_state=False)
        gy = torch.randn(B, T, H, 64, device=ctx.device, dtype=torch.bfloat16)
        first = None
        for backend in backends:
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            _time_fwd_bwd(backend, leaves, gy, ctx.device)  # warm-up (and autotuning for fla)
            ms = statistics.median(_time_fwd_bwd(backend, leaves, gy, ctx.device) for _ in range(reps)) * 1e3
            first = first or ms
            lines.append(f"| {backend}{' (stand-in)' if ctx.dry_run else ''} | {B} | {T} | {C} | {ms:.2f} | "
                         f"{ms / first:.2f}x |")
            del leaves
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    note = ("Anchor (REFERENCE.md): at B=8, T=4096, C=4096 on an H100 the official CUDA kernel takes ~56 ms and "
            "fla's chunk kernel ~54 ms fwd+bwd.")
    return SectionResult("ok", f"timed {', '.join(backends)} at {len(shapes)} shape(s)",
                         note + "\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------- train (Table 7)
def section_train(ctx: CheckContext) -> SectionResult:
    from src.diagnostics import train_step as bench

    if ctx.dry_run:
        base = bench.StepSpec(method="lora", grad_cp=False, n_layer=2, n_embd=128, vocab=512, ctx=32, batch=1,
                              steps=2, warmup=0, device="cpu", dtype="fp32", wkv_backend="torch", threads=1)
        timeout = 120.0
    else:
        need_cuda()
        base = bench.StepSpec(method="lora", grad_cp=False, n_layer=RWKV6_1B6["n_layer"],
                              n_embd=RWKV6_1B6["n_embd"], vocab=RWKV6_1B6["vocab_size"], ctx=512, batch=1,
                              steps=20, warmup=2, device="cuda", dtype="bf16", wkv_backend="auto")
        timeout = 60.0
    results, failures = [], []
    for cp in (False, True):
        for method in bench.METHODS:
            spec = replace(base, method=method, grad_cp=cp)
            try:
                results.append(bench.measure_in_subprocess(spec, ctx.env, timeout=timeout, python=ctx.python))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # reported below; the other configs still run
                failures.append(f"{method} grad_cp={int(cp)}: {_last_line(e)}")
    memory = bench.memory_columns(base.device)
    if ctx.dry_run:
        memory = memory[-1:]  # the dry run times only: its RSS is the default allocator's
    setting = "a tiny stand-in for the Bone paper's Table 7 setting" if ctx.dry_run else \
        "the Bone paper's Table 7 setting"
    details = (f"{setting[0].upper()}{setting[1:]}: RWKV6 {base.n_layer}x{base.n_embd}, vocab {base.vocab}, batch "
               f"{base.batch} x ctx {base.ctx}, {base.dtype}{' autocast' if base.dtype == 'bf16' else ''}, wkv "
               f"{base.wkv_backend}, b={base.b}, r={base.r}; median of {base.steps} steps after {base.warmup} "
               f"warm-up; each configuration in a fresh process.\n\n"
               + (bench.ratio_table(results, memory) if results else "(no results)"))
    if results:
        details += "\n\n" + paper_table7(results, memory[-1])  # CUDA: reserved, the nearest to nvidia-smi
        details += "\n\n" + train_memory_comparison(base, results, ctx.dry_run)
    goals = bench.goal_lines(results, memory[0][0])
    if goals:
        details += "\n\n" + "\n".join(f"- {g}" for g in goals)
    if failures:
        details += "\n\nFailed configurations:\n" + "\n".join(f"- {f}" for f in failures)
        return SectionResult("failed", f"{len(failures)} of {len(failures) + len(results)} configurations failed",
                             details)
    return SectionResult("ok", "; ".join(goals) or "trained every configuration", details)


def memory_table(rows: list[tuple[str, Any, int | None]], dry_run: bool) -> str:
    """Markdown: the memory estimate (src/training/memory.py) beside the measured torch.cuda.max_memory_allocated
    for each (configuration, MemoryEstimate, measured bytes or None)."""
    lines = ["| configuration | estimated peak MiB | estimated card total MiB | measured max_memory_allocated MiB "
             "| error |", "|---|---:|---:|---:|---:|"]
    for name, est, got in rows:
        measured = f"{got / 2**20:,.0f}" if got else "n/a"
        error = f"{est.peak / got - 1:+.1%}" if got else "n/a"
        lines.append(f"| {name} | {est.peak / 2**20:,.0f} | {est.device_total / 2**20:,.0f} | {measured} | {error} |")
    errors = [abs(est.peak / got - 1) for _, est, got in rows if got]
    head = ("Memory estimate against the measured peak (`python train.py ... --dry_run` prints the estimate; the "
            "card total adds the allocator's slack and the CUDA context"
            + ("; the CPU stand-in measures RSS, so only the estimates are shown" if dry_run else "")
            + (f"; largest error {max(errors):.1%}" if errors else "") + "):")
    return head + "\n\n" + "\n".join(lines)


def train_memory_comparison(base: Any, results: list[dict[str, Any]], dry_run: bool) -> str:
    """The estimate for each measured training-step configuration of the train section (plain strategy: base in
    the spec's dtype, fp32 adapter, autocast, AdamW, cross-entropy without L2Wrap) beside its CUDA peak."""
    from src.config import TrainConfig
    from src.model import RWKV6Config
    from src.training.memory import estimate_memory
    from src.wkv import resolve_backend

    mcfg = RWKV6Config(n_layer=base.n_layer, n_embd=base.n_embd, vocab_size=base.vocab)
    backend = resolve_backend(base.wkv_backend, base.device)
    rows = []
    for r in results:
        method = str(r["method"])
        adapter = dict(peft="lora", lora_r=base.r, lora_alpha=float(base.r)) if method == "lora" else \
            dict(peft="bone", bone_b=base.b, bone_grouping=method.split("-")[1])
        cfg = TrainConfig(n_layer=base.n_layer, n_embd=base.n_embd, vocab_size=base.vocab, dry_run=True,
                          ctx_len=base.ctx, micro_bsz=base.batch, grad_cp=int(r["grad_cp"]), l2wrap=0,
                          precision="bf16" if base.dtype == "bf16" else "fp32", **adapter)  # type: ignore[arg-type]
        est = estimate_memory(mcfg, cfg, 1, on_gpu=not dry_run, wkv_backend=backend)
        got = None if dry_run else int(r["peak_bytes"])
        rows.append((f"{method} grad_cp={r['grad_cp']}", est, got))
    return memory_table(rows, dry_run)


PEAK_PREFIX = "PEAK_ALLOCATED "


def train_reporting_peak(argv: list[str]) -> int:
    """Run train.py with `argv` in this process, then print torch.cuda.max_memory_allocated() on a PEAK_ALLOCATED
    line (the deepspeed section's measured peak; nothing without CUDA). Returns train.py's exit code."""
    import runpy

    import torch

    from src.diagnostics.processes import REPO_ROOT

    sys.argv = [str(REPO_ROOT / "train.py"), *argv]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if torch.cuda.is_available():
        print(f"{PEAK_PREFIX}{torch.cuda.max_memory_allocated()}", flush=True)
    return code


def deepspeed_memory_comparison(train_args: list[str], mcfg: Any, checkpoint_bytes: int, output: str,
                                dry_run: bool) -> tuple[str, float | None]:
    """The estimate for the deepspeed section's train.py run (its own flags, parsed as train.py parses them)
    beside the PEAK_ALLOCATED its process printed; (markdown, relative error or None)."""
    from src.config import load_config
    from src.training.memory import estimate_memory
    from src.wkv import resolve_backend

    cfg = load_config(train_args)
    device = "cpu" if dry_run else "cuda"
    est = estimate_memory(mcfg, cfg, 1, on_gpu=not dry_run, wkv_backend=resolve_backend(cfg.wkv_backend, device),
                          checkpoint_bytes=checkpoint_bytes)
    peaks = [int(line[len(PEAK_PREFIX):]) for line in output.splitlines() if line.startswith(PEAK_PREFIX)]
    got = peaks[-1] if peaks and not dry_run else None
    name = f"{cfg.strategy} {cfg.precision}, grad_cp {cfg.grad_cp}, ctx {cfg.ctx_len} x {cfg.micro_bsz}"
    table = memory_table([(name, est, got)], dry_run) + "\n\n```\n" + est.table() + "\n```"
    return table, (est.peak / got - 1 if got else None)


def paper_table7(results: list[dict[str, Any]], memory: tuple[str, str]) -> str:
    """Our tokens/s and memory beside the paper's Table 7 (RWKV-PEFT on an RTX 4090), with Bone-row / LoRA
    ratios for each side, per grad_cp setting."""
    from src.diagnostics.train_step import METHODS

    key, label = memory
    by = {(r["method"], r["grad_cp"]): r for r in results}
    lines = [f"Beside the Bone paper's Table 7 (its implementation, one RTX 4090, GPU memory as the paper reports "
             f"it; ours: {label}):", "",
             f"| method | grad_cp | ours tokens/s | ours {label} MiB | paper tokens/s | paper GPU MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for (method, cp), r in sorted(by.items(), key=lambda item: (item[0][1], METHODS.index(item[0][0]))):
        paper = PAPER_TABLE7.get((method, cp))
        paper_cells = f"{paper[0]:,.0f} | {paper[1]:,.0f}" if paper else "n/a | n/a"
        lines.append(f"| {method} | {cp} | {float(r['tokens_per_s']):,.0f} | {float(r[key]) / 2**20:,.0f} | "
                     f"{paper_cells} |")
    for cp in sorted({cp for _, cp in by}):
        row, lora = by.get(("bone-row", cp)), by.get(("lora", cp))
        if row is None or lora is None:
            continue
        ours = (f"{float(row['tokens_per_s']) / float(lora['tokens_per_s']):.2f}x speed at "
                f"{float(row[key]) / float(lora[key]):.2f}x memory")
        p_row, p_lora = PAPER_TABLE7.get(("bone-row", cp)), PAPER_TABLE7.get(("lora", cp))
        paper = (f"{p_row[0] / p_lora[0]:.2f}x speed at {p_row[1] / p_lora[1]:.2f}x memory"
                 if p_row and p_lora else "n/a")
        lines.append(f"| Bone-row / LoRA | {cp} | {ours} | | paper: {paper} | |")
    return "\n".join(lines)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------- deepspeed
def sft_rows(n: int, min_tokens: int) -> list[str]:
    """n SFT records ({"prompt", "response"}) whose responses are each at least ~min_tokens World tokens long
    (sums written out, about six tokens each)."""
    rows = []
    for i in range(n):
        sums = " ".join(f"{a} + {i + 3} = {a + i + 3}." for a in range(2, 2 + max(1, min_tokens // 5)))
        rows.append(json.dumps({"prompt": f"Write out the sums with {i + 3}.", "response": sums}))
    return rows


def section_deepspeed(ctx: CheckContext) -> SectionResult:
    """One optimizer step of the 1.6B preset (configs/rwkv6-1.6b-4x4090.yaml: DeepSpeed ZeRO-2, bf16, grad_cp 1,
    Bone-row b=64) through train.py on one GPU at RWKV6-1.6B shapes, ctx 512, micro_bsz 1; then the adapter file
    must hold every Bone tensor in fp32, finite, and moved off zero by the step."""
    import torch

    from src.adapters import AdapterConfig, count_adapter_parameters
    from src.checkpoint import load_tensors
    from src.diagnostics.random_model import save_random_checkpoint
    from src.model import RWKV6Config
    from src.run_files import FINAL_TAG, read_loss_curves, state_path, weights_file

    if ctx.dry_run:
        mcfg, ctx_len, kind = RWKV6Config(n_layer=2, n_embd=128, vocab_size=65536), 64, "noisy_init"
        hw = ["--strategy", "auto", "--accelerator", "cpu", "--precision", "fp32", "--wkv_backend", "torch"]
        timeout = 170.0
    else:
        need_cuda()
        mcfg, ctx_len, kind = RWKV6Config(**RWKV6_1B6), 512, "fast_random"
        hw = ["--accelerator", "gpu", "--wkv_backend", "auto"]  # strategy, precision, grad_cp: the preset's
        timeout = 200.0  # within the section's time box (src/diagnostics/gpu_check.py: CAPS)
    with tempfile.TemporaryDirectory(prefix="gpu_check_ds_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        ckpt = save_random_checkpoint(folder / "base.pth", mcfg, seed=0, dtype=torch.bfloat16, kind=kind,
                                      device=ctx.device)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
        made = time.perf_counter() - start
        train, val = folder / "train.jsonl", folder / "val.jsonl"
        rows = sft_rows(2, min_tokens=ctx_len + 64)  # longer than ctx_len: every sample a full window
        train.write_text(rows[0] + "\n")  # one document, micro_bsz 1, 1 device: exactly one optimizer step
        val.write_text(rows[1] + "\n")
        proj = folder / "run"
        args = ["--config", PRESET, "--load_model", str(ckpt), "--data_file", str(train),
                "--val_file", str(val), "--proj_dir", str(proj), "--devices", "1", "--num_nodes", "1",
                "--ctx_len", str(ctx_len), "--micro_bsz", "1", "--accumulate_grad_batches", "1",
                "--epoch_count", "1", "--epoch_save", "1", "--log_every", "1", *hw]
        # train.py in a process that prints its torch.cuda.max_memory_allocated() at the end
        cmd = function_command(ctx.python, __name__, "train_reporting_peak", args)
        start = time.perf_counter()
        proc = run_killable(cmd, timeout, {**ctx.env, "WANDB_MODE": "disabled"})
        took = time.perf_counter() - start
        shown = "train.py " + " ".join(args).replace(str(folder), "$TMP")
        details = (f"Random bf16 checkpoint {mcfg.n_layer}x{mcfg.n_embd}, vocab {mcfg.vocab_size}, official key "
                   f"names ({kind}), written in {made:.1f} s.\n\n`python {shown}`\n\nexit {proc.returncode} after "
                   f"{took:.1f} s")
        if proc.returncode != 0:
            return SectionResult("failed", f"train.py exited with {proc.returncode}",
                                 details + f"\n\n```\n{last_lines(proc.stdout + proc.stderr, 25)}\n```")
        train_curve, val_curve = read_loss_curves(proj)
        losses, vals = list(train_curve.values()), list(val_curve.values())
        problems = []
        if len(losses) != 1:
            problems.append(f"expected 1 optimizer step, metrics have {len(losses)}")
        if not all(map(math.isfinite, losses + vals)) or not vals:
            problems.append(f"train loss {losses}, val loss {vals}: not all finite or no validation")
        adapter_file = weights_file(proj, FINAL_TAG)
        expected = count_adapter_parameters(mcfg, AdapterConfig(method="bone", b=64, grouping="row"))
        if adapter_file.is_file():
            adapter = load_tensors(adapter_file)
            problems += adapter_problems(adapter, expected)
            details += (f"; train loss {losses}, val loss {vals}; adapter: {len(adapter)} tensors, "
                        f"{sum(t.numel() for t in adapter.values()):,} values (expected {expected:,}), dtypes "
                        f"{sorted({str(t.dtype) for t in adapter.values()})}")
        else:
            problems.append(f"no {adapter_file.name}")
        if not ctx.dry_run and not state_path(proj, 1).is_dir():
            problems.append("the training state is not a DeepSpeed checkpoint folder")
        memory, error = deepspeed_memory_comparison(args, mcfg, ckpt.stat().st_size, proc.stdout, ctx.dry_run)
        details += "\n\n" + memory
    what = ("Lightning default strategy on CPU, fp32, tiny model (stand-in: Lightning's DeepSpeed needs CUDA)"
            if ctx.dry_run else "DeepSpeed ZeRO-2, bf16, grad_cp 1, 1 GPU, RWKV6-1.6B shapes, ctx 512")
    if problems:
        return SectionResult("failed", f"{what}: {'; '.join(problems)}", details)
    estimate = f"; peak {error:+.1%} off the memory estimate" if error is not None else ""
    return SectionResult("ok", f"{what}: 1 Bone-row step, loss {losses[0]:.3f}, fp32 adapter of {expected:,} "
                               f"finite values{estimate}", details)


def adapter_problems(adapter: Mapping[str, Any], expected_values: int) -> list[str]:
    """What is wrong with a trained adapter's tensors: not fp32, not finite, all zero (the step did not reach
    them: Bone starts at zero), or not `expected_values` values in all."""
    import torch

    problems = []
    not_fp32 = sorted(k for k, t in adapter.items() if t.dtype != torch.float32)
    if not_fp32:
        problems.append(f"{len(not_fp32)} adapter tensors are not fp32 (e.g. {not_fp32[0]})")
    not_finite = sorted(k for k, t in adapter.items() if not bool(torch.isfinite(t).all()))
    if not_finite:
        problems.append(f"{len(not_finite)} adapter tensors hold NaN/Inf (e.g. {not_finite[0]})")
    untouched = sorted(k for k, t in adapter.items() if not bool(t.count_nonzero()))
    if untouched:
        problems.append(f"{len(untouched)} adapter tensors are still zero after the step (e.g. {untouched[0]})")
    total = sum(t.numel() for t in adapter.values())
    if total != expected_values:
        problems.append(f"the adapter holds {total:,} values, expected {expected_values:,}")
    return problems


# ----------------------------------------------------------------------------------------------- quant
QUANT_BASES = ("bf16", "int8", "nf4")


def section_quant(ctx: CheckContext) -> SectionResult:
    """Bone-row (b = 64) training steps on a bf16 / int8 / nf4 base at RWKV6-7B widths (n_embd 4096, vocab 65536;
    4 of its 32 layers), ctx 1024, batch 1, grad_cp: step time and max_memory_allocated beside the estimate."""
    import torch

    from src.adapters.config import AdapterConfig
    from src.adapters.inject import adapter_parameters, inject_adapters
    from src.checkpoint import save_tensors
    from src.config import TrainConfig
    from src.diagnostics.random_model import random_state_dict
    from src.model import RWKV6, RWKV6Config
    from src.training.memory import estimate_memory

    if ctx.dry_run:
        sizes, T, reps, dtype, backend = dict(n_layer=2, n_embd=128, vocab_size=512), 32, 1, torch.float32, "torch"
    else:
        need_cuda()
        sizes, T, reps, dtype, backend = dict(n_layer=4, n_embd=4096, vocab_size=65536), 1024, 3, torch.bfloat16, \
            "auto"
    mcfg = RWKV6Config(**sizes)  # type: ignore[arg-type]
    acfg = AdapterConfig(method="bone", b=64)
    lines = ["| base | step ms (median) | vs bf16 |", "|---|---:|---:|"]
    memory_rows: list[tuple[str, Any, int | None]] = []
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        save_tensors(path, random_state_dict(mcfg, kind="fast_random", dtype=torch.bfloat16))
        idx = torch.randint(0, mcfg.vocab_size, (1, T), device=ctx.device)
        for base in QUANT_BASES:
            quant = None if base == "bf16" else base
            model = RWKV6.from_checkpoint(path, dtype=dtype, quant=quant, wkv_backend=backend, grad_cp=True)
            inject_adapters(model, acfg)
            model.to(ctx.device).train()
            params = list(adapter_parameters(model, acfg).values())
            for t in params:
                t.data = t.data.float()
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(reps + 1):
                _sync(ctx.device)
                start = time.perf_counter()
                with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=ctx.device == "cuda"):
                    loss = model(idx).float().logsumexp(-1).mean()
                loss.backward()
                _sync(ctx.device)
                times.append(time.perf_counter() - start)
            ms = statistics.median(times[1:]) * 1e3
            first = first or ms
            peak = torch.cuda.max_memory_allocated() if ctx.device == "cuda" else None
            cfg = TrainConfig(**sizes, dry_run=True, ctx_len=T, micro_bsz=1, grad_cp=1, l2wrap=0, peft="bone",
                              bone_b=64, quant=quant or "none",
                              precision="bf16" if ctx.device == "cuda" else "fp32")  # type: ignore[arg-type]
            memory_rows.append((base, estimate_memory(mcfg, cfg, 1, on_gpu=ctx.device == "cuda"), peak))
            lines.append(f"| {base} | {ms:.1f} | {ms / first:.2f}x |")
            del model, params, loss
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    math = "bf16 autocast" if ctx.device == "cuda" else "fp32 (CPU stand-in)"
    note = (f"{mcfg.n_layer} layers x {mcfg.n_embd}, vocab {mcfg.vocab_size}, ctx {T}, batch 1, grad_cp, {math}, "
            "fp32 adapters; forward + backward without an optimizer step. The 7B headline "
            "(`train.py --n_layer 32 --n_embd 4096 --vocab_size 65536 --quant nf4 --bone_b 64 --ctx_len 1024 "
            "--grad_cp 1 --dry_run`) is the estimate these rows check.")
    return SectionResult("ok", f"Bone-row on {', '.join(QUANT_BASES)} bases",
                         note + "\n\n" + "\n".join(lines) + "\n\n" + memory_table(memory_rows, ctx.dry_run))


SECTION_FUNCS: dict[str, Callable[[CheckContext], SectionResult]] = {
    "environment": section_environment, "build": section_build, "compare": section_compare,
    "deepspeed": section_deepspeed, "train": section_train, "timing": section_timing, "quant": section_quant,
}
