"""Measuring full training steps (forward + backward + AdamW step) of a random RWKV6 with Bone-row, Bone-col or
LoRA injected, at equal trainable parameters (b=64, r=32): tokens/s and peak memory. Used by the training-step
benchmark (`python -m scripts.bench.train_step`) and the GPU check's Table 7 section.

Speed: `time_side_by_side` builds every method's model in one process and times their steps round-robin (the
order reversed every other round, after the warm-up steps), so that a change in the machine's load hits all
methods alike; a configuration's tokens/s comes from its median step time.
Peak memory, each configuration in a fresh process of its own (so one's allocations cannot hide in another's
peak), on CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs once the model is built)
minus the resident size at that moment, i.e. what training adds on top of the weights (activations, gradients,
optimizer state); measured with glibc's mmap threshold fixed at 64 KiB (`run_all`), freed tensors return to the
OS and RSS tracks live memory ("peak live added"); the default allocator's RSS, which also holds heap slack that
varies from run to run, is kept beside it. On CUDA: torch.cuda.max_memory_allocated and max_memory_reserved
(absolute, weights included).
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from src.diagnostics.processes import function_command, run_killable

METHODS = ("lora", "bone-row", "bone-col")
RESULT_PREFIX = "RESULT "
MMAP_THRESHOLD = str(64 * 1024)  # MALLOC_MMAP_THRESHOLD_ for the "peak live added" measurement on CPU

Result = dict[str, Any]


@dataclass(frozen=True)
class StepSpec:
    """One configuration to measure."""

    method: str
    grad_cp: bool
    n_layer: int = 2
    n_embd: int = 512
    vocab: int = 4096
    ctx: int = 512
    batch: int = 1
    b: int = 64
    r: int = 32
    steps: int = 10
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "fp32"  # base weights; bf16 also turns on bf16 autocast
    wkv_backend: str = "torch"
    threads: int = 1
    seed: int = 0


def adapter_config(method: str, b: int, r: int):  # -> AdapterConfig
    from src.adapters import AdapterConfig

    if method == "lora":
        return AdapterConfig(method="lora", lora_r=r, lora_alpha=float(r))
    if method in ("bone-row", "bone-col"):
        return AdapterConfig(method="bone", b=b, grouping=method.split("-")[1])
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def build_model(spec: StepSpec):  # -> RWKV6
    """A random RWKV6 of the spec's sizes on its device (fast random values, base in spec.dtype, frozen) with the
    adapter injected (adapter tensors fp32)."""
    import torch

    from src.adapters import inject_adapters
    from src.diagnostics.random_model import random_model
    from src.model import RWKV6Config

    cfg = RWKV6Config(n_layer=spec.n_layer, n_embd=spec.n_embd, vocab_size=spec.vocab,
                      wkv_backend=spec.wkv_backend, grad_cp=spec.grad_cp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.dtype]
    model = random_model(cfg, spec.seed, dtype, spec.device)
    torch.manual_seed(spec.seed)
    inject_adapters(model, adapter_config(spec.method, spec.b, spec.r))
    return model.with_runtime(grad_cp=spec.grad_cp).train()


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: peak RSS cannot be measured on this system")
    return int(match[1])


def make_step(spec: StepSpec) -> tuple[Callable[[], float], int]:
    """A training-step closure for spec's model (returns the step's seconds) and the trainable parameter count."""
    import torch
    import torch.nn.functional as F

    from src.adapters import adapter_parameters

    torch.set_num_threads(spec.threads)
    cuda = spec.device.startswith("cuda")
    model = build_model(spec)
    params = list(adapter_parameters(model, adapter_config(spec.method, spec.b, spec.r)).values())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    idx = torch.randint(0, spec.vocab, (spec.batch, spec.ctx + 1), generator=gen).to(spec.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and spec.dtype == "bf16" else nullcontext()

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            logits = model(idx[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{spec.method}: non-finite loss {loss.item()}")
        return time.perf_counter() - start

    return step, sum(p.numel() for p in params)


def measure(spec: StepSpec) -> Result:
    """Run spec.warmup + spec.steps training steps in this process; tokens/s from the median step time and the
    peak memory (CPU: RSS, and what training added to it; CUDA: max allocated and max reserved, absolute)."""
    import torch

    cuda = spec.device.startswith("cuda")
    step, n_params = make_step(spec)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base_bytes = _proc_status_kib("VmRSS") * 1024
    for _ in range(spec.warmup):
        step()
    times = [step() for _ in range(spec.steps)]
    extra: Result = {}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        extra["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        peak = _proc_status_kib("VmHWM") * 1024
    return {"method": spec.method, "grad_cp": int(spec.grad_cp), "params": n_params,
            "tokens_per_s": spec.batch * spec.ctx / statistics.median(times), "peak_bytes": peak,
            "added_bytes": peak - base_bytes, "step_s": statistics.median(times), **extra}


def time_side_by_side(specs: Sequence[StepSpec]) -> list[Result]:
    """Build every spec's model in this process, then time their steps round-robin (order reversed every other
    round): spec.warmup untimed steps each, then spec.steps timed ones. tokens/s from each median wall time;
    the process's CPU time per step is kept too (less sensitive to other jobs taking the cores, on CPU)."""
    steps = [make_step(spec) for spec in specs]
    for spec, (step, _) in zip(specs, steps, strict=True):
        for _ in range(spec.warmup):
            step()
    wall: list[list[float]] = [[] for _ in specs]
    cpu: list[list[float]] = [[] for _ in specs]
    order = list(range(len(specs)))
    for rnd in range(max(spec.steps for spec in specs)):
        for i in (order if rnd % 2 == 0 else order[::-1]):
            if rnd < specs[i].steps:
                start = time.process_time()
                wall[i].append(steps[i][0]())
                cpu[i].append(time.process_time() - start)
    return [{"method": spec.method, "grad_cp": int(spec.grad_cp), "params": n_params,
             "tokens_per_s": spec.batch * spec.ctx / statistics.median(w), "step_s": statistics.median(w),
             "tokens_per_cpu_s": spec.batch * spec.ctx / statistics.median(c), "step_s_all": w}
            for spec, (_, n_params), w, c in zip(specs, steps, wall, cpu, strict=True)]


# ----------------------------------------------------------------------------------------------- fresh processes
def worker_main(argv: Sequence[str]) -> int:
    """A measuring process (argv: "measure" and one spec, or "side_by_side" and a list of specs, as JSON):
    prints its result on a RESULT line."""
    kind, payload = argv
    if kind == "measure":
        result: object = measure(StepSpec(**json.loads(payload)))
    elif kind == "side_by_side":
        result = time_side_by_side([StepSpec(**s) for s in json.loads(payload)])
    else:
        raise ValueError(f"unknown worker kind {kind!r}")
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def _in_fresh_process(kind: str, payload: object, env: Mapping[str, str] | None, timeout: float | None,
                      python: str) -> Any:
    """worker_main(kind, payload) in a fresh Python process (its whole process group killed after `timeout`
    seconds: subprocess.TimeoutExpired); its RESULT line, parsed; RuntimeError with its stderr if it fails."""
    cmd = function_command(python, __name__, "worker_main", [kind, json.dumps(payload)])
    proc = run_killable(cmd, timeout, env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {payload} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def measure_in_subprocess(spec: StepSpec, env: Mapping[str, str] | None = None, timeout: float | None = None,
                          python: str = sys.executable) -> Result:
    """measure(spec) in a fresh Python process with environment `env` (None: this process's)."""
    return _in_fresh_process("measure", asdict(spec), env, timeout, python)


def run_all(base: StepSpec, methods: Sequence[str], grad_cps: Sequence[bool], env: Mapping[str, str],
            timeout: float | None = None, python: str = sys.executable) -> list[Result]:
    """Speed of every method side by side in one fresh process per grad_cp setting; on CPU the peak memory of
    every (method, grad_cp) in a fresh process of its own, twice: with glibc's mmap threshold fixed at 64 KiB
    (MALLOC_MMAP_THRESHOLD_, so that freed tensors go back to the OS and the resident size tracks live memory
    instead of heap slack; that setting slows allocation, so it is never used for timing) and with the default
    allocator. On CUDA the memory comes from one measure() process per configuration."""
    results = []
    cpu = not base.device.startswith("cuda")
    for cp in grad_cps:
        specs = [replace(base, method=m, grad_cp=cp) for m in methods]
        timed = _in_fresh_process("side_by_side", [asdict(s) for s in specs], env, timeout, python)
        for spec, r in zip(specs, timed, strict=True):
            mem_spec = replace(spec, steps=1, warmup=1)
            if cpu:
                live = measure_in_subprocess(mem_spec, {**env, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}, timeout,
                                             python)
                r["live_added_bytes"] = live["added_bytes"]
            mem = measure_in_subprocess(mem_spec, env, timeout, python)
            r.update({k: v for k, v in mem.items() if k in ("peak_bytes", "added_bytes", "peak_reserved_bytes")})
            results.append(r)
    return results


# ----------------------------------------------------------------------------------------------- reports
def memory_columns(device: str) -> list[tuple[str, str]]:
    """(result key, column label) of the memory measurements for a device; the first one is the goal's."""
    if device.startswith("cuda"):
        return [("peak_bytes", "peak allocated"), ("peak_reserved_bytes", "peak reserved")]
    return [("live_added_bytes", "peak live added"), ("added_bytes", "peak RSS added (default malloc)")]


def ratio_table(results: Sequence[Result], memory: Sequence[tuple[str, str]]) -> str:
    """Markdown table; ratios are to LoRA with the same grad_cp."""
    lora = {r["grad_cp"]: r for r in results if r["method"] == "lora"}
    head = "| method | grad_cp | trainable params | tokens/s | speed vs LoRA |"
    rule = "|---|---:|---:|---:|---:|"
    for _, label in memory:
        head += f" {label} MiB | vs LoRA |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in sorted(results, key=lambda r: (r["grad_cp"], METHODS.index(str(r["method"])))):
        ref = lora.get(r["grad_cp"])
        speed = f"{float(r['tokens_per_s']) / float(ref['tokens_per_s']):.2f}x" if ref else "n/a"
        line = f"| {r['method']} | {r['grad_cp']} | {int(r['params']):,} | {float(r['tokens_per_s']):,.1f} | {speed} |"
        for key, _ in memory:
            ratio = f"{float(r[key]) / float(ref[key]):.2f}x" if ref and float(ref[key]) > 0 else "n/a"
            line += f" {float(r[key]) / 2**20:,.1f} | {ratio} |"
        lines.append(line)
    return "\n".join(lines)


def goal_lines(results: Sequence[Result], memory_key: str) -> list[str]:
    """The goal: Bone-row >= 0.95x LoRA's tokens/s at <= 1.02x its peak memory (per grad_cp setting)."""
    out = []
    by = {(r["method"], r["grad_cp"]): r for r in results}
    for cp in sorted({r["grad_cp"] for r in results}):
        row, lora = by.get(("bone-row", cp)), by.get(("lora", cp))
        if row is None or lora is None:
            continue
        speed = float(row["tokens_per_s"]) / float(lora["tokens_per_s"])
        mem = float(row[memory_key]) / float(lora[memory_key])
        ok = speed >= 0.95 and mem <= 1.02
        out.append(f"grad_cp={cp}: Bone-row {speed:.3f}x LoRA's tokens/s at {mem:.3f}x its memory -> "
                   f"{'meets' if ok else 'MISSES'} the goal (>= 0.95x speed, <= 1.02x memory)")
    return out


def noise_lines(results: Sequence[Result]) -> list[str]:
    """How much the machine's noise moves Bone-row's speed ratio: LoRA's step time over Bone-row's within each
    round (quartiles, range), and the ratio of tokens per CPU-second (medians)."""
    by = {(r["method"], r["grad_cp"]): r for r in results}
    out = []
    for cp in sorted({r["grad_cp"] for r in results}):
        row, lora = by.get(("bone-row", cp)), by.get(("lora", cp))
        if row is None or lora is None or "step_s_all" not in row:
            continue
        ratios = [a / b for a, b in zip(lora["step_s_all"], row["step_s_all"], strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        cpu = float(row["tokens_per_cpu_s"]) / float(lora["tokens_per_cpu_s"])
        out.append(f"grad_cp={cp}: Bone-row/LoRA speed within a round over {len(ratios)} rounds: quartiles "
                   f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; "
                   f"per CPU-second {cpu:.3f}x")
    return out
