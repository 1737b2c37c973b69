"""Benchmark full training steps (forward + backward + AdamW step) of an RWKV6 with Bone-row, Bone-col and
LoRA at equal trainable parameters (b=64, r=32), with and without gradient checkpointing.

    python scripts/bench/train_step.py [--n_layer 4 --n_embd 1024 --ctx 512 --vocab 4096 --steps 3 --rounds 2]
    python scripts/bench/train_step.py --quick            # smoke run: tiny model, one step
    python scripts/bench/train_step.py --device cuda --dtype bf16 --n_layer 24 --n_embd 2048 --vocab 65536

Every configuration runs in a fresh subprocess (so one's allocations cannot hide in another's peak), in
round-robin order over --rounds rounds; a configuration's tokens/s is its best round (median step time within
a round, after --warmup steps). Peak memory on CPU: the peak resident set size (VmHWM, reset through
/proc/self/clear_refs once the model is built) minus the resident size at that moment, i.e. what training
adds on top of the weights (activations, gradients, optimizer state). It is measured in an extra process per
configuration with glibc's mmap threshold fixed at 64 KiB, so that freed tensors return to the OS and RSS
tracks live memory ("peak live added"); the default allocator's RSS, which also holds heap slack that varies
from run to run, is shown beside it. On CUDA: torch.cuda.max_memory_allocated (absolute, weights included).
Prints a markdown table of ratios to LoRA with the same gradient-checkpointing setting, all from this one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from src.adapters import AdapterConfig, adapter_parameters, inject_adapters  # noqa: E402
from src.model import RWKV6, RWKV6Config  # noqa: E402

METHODS = ("lora", "bone-row", "bone-col")
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class StepSpec:
    """One configuration to measure."""

    method: str
    grad_cp: bool
    n_layer: int = 4
    n_embd: int = 1024
    vocab: int = 4096
    ctx: int = 512
    batch: int = 1
    b: int = 64
    r: int = 32
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "fp32"  # base weights; bf16 also turns on bf16 autocast
    wkv_backend: str = "torch"
    threads: int = 1
    seed: int = 0


def adapter_config(method: str, b: int, r: int) -> AdapterConfig:
    if method == "lora":
        return AdapterConfig(method="lora", lora_r=r, lora_alpha=float(r))
    if method in ("bone-row", "bone-col"):
        return AdapterConfig(method="bone", b=b, grouping=method.split("-")[1])
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


@torch.no_grad()
def random_init(model: RWKV6, seed: int) -> None:
    """Fast random weights with sane magnitudes, generated on the model's device (the project's init_weights
    orthogonalises every matrix on the CPU, which takes minutes at 1.6B): projections ~ N(0, 1/in), output
    projections ~ N(0, 0.1/in), decays spread over the official range, mixes 0.5, norms 1."""
    gen = torch.Generator(device=model.emb.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and p.ndim == 1:  # LayerNorm, GroupNorm
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        elif leaf == "time_decay":
            p.copy_(torch.linspace(-6.0, -1.0, p.numel(), device=p.device).view_as(p))
        elif leaf.startswith("time_maa") and p.ndim == 3 and p.shape[0] == 1:
            p.fill_(0.5)
        elif p.ndim == 2 and leaf == "weight":
            std = 1e-2 if name == "emb.weight" else p.shape[1] ** -0.5
            if name.endswith(("att.output.weight", "ffn.value.weight")):
                std *= 0.1
            p.normal_(0.0, std, generator=gen)
        else:  # low-rank mixers, bonus
            p.normal_(0.0, 1e-2, generator=gen)


def build_model(spec: StepSpec) -> RWKV6:
    """A random RWKV6 of the spec's sizes with the adapter injected (adapter tensors fp32, base frozen)."""
    cfg = RWKV6Config(n_layer=spec.n_layer, n_embd=spec.n_embd, vocab_size=spec.vocab,
                      wkv_backend=spec.wkv_backend, grad_cp=spec.grad_cp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.dtype]
    with torch.device("meta"):
        model = RWKV6(cfg)
    model = model.to_empty(device=spec.device).to(dtype)
    random_init(model, spec.seed)
    torch.manual_seed(spec.seed)
    inject_adapters(model, adapter_config(spec.method, spec.b, spec.r))
    return model.with_runtime(grad_cp=spec.grad_cp).train()


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: peak RSS cannot be measured on this system")
    return int(match[1])


def measure(spec: StepSpec) -> dict[str, float | int | str]:
    """Run spec.warmup + spec.steps training steps in this process; tokens/s from the median step time and
    the peak memory added by training (CPU: RSS; CUDA: max_memory_allocated, absolute)."""
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
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        added = peak - base_bytes
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        added = peak - base_bytes
    return {"method": spec.method, "grad_cp": int(spec.grad_cp), "params": sum(p.numel() for p in params),
            "tokens_per_s": spec.batch * spec.ctx / statistics.median(times), "peak_bytes": peak,
            "added_bytes": added, "step_s": statistics.median(times)}


def measure_in_subprocess(spec: StepSpec, timeout: float | None = None,
                          extra_env: dict[str, str] | None = None) -> dict[str, float | int | str]:
    """measure(spec) in a fresh Python process; RuntimeError with its stderr if it fails."""
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec.method} grad_cp={int(spec.grad_cp)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def memory_columns(device: str) -> list[tuple[str, str]]:
    """(result key, column label) of the memory measurements for a device; the first one is the goal's."""
    if device.startswith("cuda"):
        return [("peak_bytes", "peak allocated")]
    return [("live_added_bytes", "peak live added"), ("added_bytes", "peak RSS added (default malloc)")]


def ratio_table(results: list[dict[str, float | int | str]], memory: list[tuple[str, str]]) -> str:
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


def goal_lines(results: list[dict[str, float | int | str]], memory_key: str) -> list[str]:
    """The goal: Bone-row >= 0.95x LoRA's tokens/s at <= 1.05x its peak memory (per grad_cp setting)."""
    out = []
    by = {(r["method"], r["grad_cp"]): r for r in results}
    for cp in sorted({r["grad_cp"] for r in results}):
        row, lora = by.get(("bone-row", cp)), by.get(("lora", cp))
        if row is None or lora is None:
            continue
        speed = float(row["tokens_per_s"]) / float(lora["tokens_per_s"])
        mem = float(row[memory_key]) / float(lora[memory_key])
        ok = speed >= 0.95 and mem <= 1.05
        out.append(f"grad_cp={cp}: Bone-row {speed:.3f}x LoRA's tokens/s at {mem:.3f}x its memory -> "
                   f"{'meets' if ok else 'MISSES'} the goal (>= 0.95x speed, <= 1.05x memory)")
    return out


def run_all(base: StepSpec, methods: list[str], grad_cps: list[bool], rounds: int,
            timeout: float | None = None) -> list[dict[str, float | int | str]]:
    """Every (method, grad_cp) in fresh subprocesses, round-robin; best tokens/s per configuration.

    On CPU the peak memory is also measured once per configuration in a separate process whose glibc
    mmap threshold is fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that freed tensors go back to the OS and
    the resident size tracks live memory instead of heap slack; that setting slows allocation, so it is
    never used for timing. The default-allocator RSS of the timed runs is reported beside it."""
    best: dict[tuple[str, bool], dict[str, float | int | str]] = {}
    cpu = not base.device.startswith("cuda")
    for rnd in range(rounds):
        for cp in grad_cps:
            for m in methods:
                spec = replace(base, method=m, grad_cp=cp)
                r = measure_in_subprocess(spec, timeout)
                cur = best.setdefault((m, cp), r)
                cur["tokens_per_s"] = max(float(cur["tokens_per_s"]), float(r["tokens_per_s"]))
                for key in ("peak_bytes", "added_bytes"):
                    cur[key] = min(float(cur[key]), float(r[key]))
                if cpu and rnd == 0:
                    live = measure_in_subprocess(replace(spec, steps=1, warmup=1), timeout,
                                                 extra_env={"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
                    cur["live_added_bytes"] = live["added_bytes"]
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--b", type=int, default=64, help="Bone block size")
    ap.add_argument("--r", type=int, default=32, help="LoRA rank (r = b/2 gives equal parameters on RWKV6)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="round-robin repetitions of every configuration")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--grad_cp", default="0,1", help="comma-separated 0/1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--wkv_backend", default="torch")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per configuration")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2x256 model, ctx 64, one round of one step")
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(measure(StepSpec(**json.loads(args.worker)))), flush=True)
        return 0
    if args.quick:
        args.n_layer, args.n_embd, args.vocab, args.ctx, args.steps, args.warmup, args.rounds = 2, 256, 512, 64, 1, 1, 1
    base = StepSpec(method="lora", grad_cp=False, n_layer=args.n_layer, n_embd=args.n_embd, vocab=args.vocab,
                    ctx=args.ctx, batch=args.batch, b=args.b, r=args.r, steps=args.steps, warmup=args.warmup,
                    device=args.device, dtype=args.dtype, wkv_backend=args.wkv_backend, threads=args.threads)
    methods = args.methods.split(",")
    for m in methods:
        adapter_config(m, args.b, args.r)  # fail fast on a typo
    grad_cps = [bool(int(c)) for c in args.grad_cp.split(",")]
    print(f"RWKV6 {args.n_layer}x{args.n_embd}, vocab {args.vocab}, batch {args.batch} x ctx {args.ctx}, "
          f"{args.dtype} on {args.device}, wkv {args.wkv_backend}, b={args.b}, r={args.r}, {args.threads} thread(s), "
          f"median of {args.steps} steps after {args.warmup} warmup, best of {args.rounds} round(s), "
          f"torch {torch.__version__}\n", flush=True)
    results = run_all(base, methods, grad_cps, args.rounds)
    memory = memory_columns(args.device)
    print(ratio_table(results, memory))
    print()
    for line in goal_lines(results, memory[0][0]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
