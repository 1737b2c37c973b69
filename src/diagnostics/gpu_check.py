"""The GPU check's driver: runs the sections of src/diagnostics/sections.py, each in a fresh process with its
own time box (a failing or hanging section is reported and the others still run), within a budget for the whole
check (one H100/H200: under 8 minutes), and renders the markdown report. The CLI is `python -m scripts.gpu_check`
(`bash scripts/gpu_check.sh`)."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from src.diagnostics.processes import function_command, last_lines, run_killable
from src.diagnostics.sections import SECTION_FUNCS, CheckContext, SectionResult

SECTIONS = tuple(SECTION_FUNCS)  # in the order they run: the cheap and the preset-mode checks first
CUDA_ONLY = ("build",)  # skipped in a dry run; every other section has a CPU stand-in
# Per-section time boxes (seconds) on a GPU; the whole check is also capped by its budget. Expected on an
# H100/H200: build 60-120 s on a first compile (seconds from torch's cache), compare ~30, deepspeed ~90 (writing
# and loading a 3 GB checkpoint, DeepSpeed start-up), train ~90 (six fresh 1.6B processes), timing ~40, quant
# ~60 (writing a 2.7 GB checkpoint, quantising 32 matrices of 4096 x 4096 on the CPU three times).
CAPS = {"environment": 60, "build": 240, "compare": 120, "deepspeed": 240, "train": 180, "timing": 120,
        "quant": 150}
DRY_CAPS = {name: 240 for name in SECTIONS}
DEFAULT_BUDGET = 470.0  # seconds: the check's 8 minutes less start-up and the report
MIN_SECTION_SECONDS = 15.0  # a section is not started with less of the budget left


def section_main(argv: Sequence[str]) -> int:
    """Inside a section's process (argv: name, context file, result file): run the section and write its
    SectionResult; an exception is the section's failure, written as its result."""
    name, context_file, result_file = argv
    saved = json.loads(Path(context_file).read_text())
    ctx = CheckContext(dry_run=saved["dry_run"], env=saved["env"], python=saved["python"])
    try:
        result = SECTION_FUNCS[name](ctx)
    except Exception as e:  # the section failed: its error is the result (written for the report), not lost
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = SectionResult("failed", f"{type(e).__name__}: {first}",
                               f"```\n{traceback.format_exc(limit=8).strip()}\n```")
    Path(result_file).write_text(json.dumps(asdict(result)))
    return 0


def run_section_subprocess(name: str, ctx: CheckContext, timeout: float) -> SectionResult:
    """Run one section in a fresh process, time-boxed; a crash or timeout becomes a failed/timeout result."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        context_file, result_file = Path(tmp) / "context.json", Path(tmp) / "result.json"
        context_file.write_text(json.dumps({"dry_run": ctx.dry_run, "env": dict(ctx.env), "python": ctx.python}))
        cmd = function_command(ctx.python, __name__, "section_main", [name, str(context_file), str(result_file)])
        start = time.perf_counter()
        try:
            proc = run_killable(cmd, timeout, ctx.env)
        except subprocess.TimeoutExpired as e:
            tail = last_lines((e.output or "") + (e.stderr or ""), 15)
            return SectionResult("timeout", f"did not finish within its {timeout:.0f} s time box",
                                 f"```\n{tail}\n```" if tail else "", time.perf_counter() - start)
        took = time.perf_counter() - start
        if result_file.is_file():
            result = SectionResult(**json.loads(result_file.read_text()))
            result.seconds = took
            return result
        return SectionResult("failed", f"the section process exited with {proc.returncode} without a result",
                             f"```\n{last_lines(proc.stdout + proc.stderr, 25)}\n```", took)


def run_check(sections: Sequence[str], ctx: CheckContext, budget: float = DEFAULT_BUDGET,
              progress: Callable[[str, SectionResult], None] | None = None) -> tuple[dict[str, SectionResult], float]:
    """Run `sections` in SECTIONS order within `budget` seconds; (results by name, seconds taken)."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    caps = DRY_CAPS if ctx.dry_run else CAPS
    start = time.perf_counter()
    results: dict[str, SectionResult] = {}
    for name in [s for s in SECTIONS if s in sections]:
        left = budget - (time.perf_counter() - start)
        if ctx.dry_run and name in CUDA_ONLY:
            results[name] = SectionResult("skipped", "dry run: needs a CUDA GPU and a CUDA build of torch")
        elif left < MIN_SECTION_SECONDS:
            results[name] = SectionResult("skipped", f"the {budget:.0f} s budget ran out before this section")
        else:
            results[name] = run_section_subprocess(name, ctx, min(caps[name], left))
        if progress is not None:
            progress(name, results[name])
    return results, time.perf_counter() - start


def failed(results: Mapping[str, SectionResult]) -> bool:
    return any(r.status in ("failed", "timeout") for r in results.values())


def render_report(results: Mapping[str, SectionResult], dry_run: bool, env: Mapping[str, str], total: float) -> str:
    mode = ("DRY RUN: CPU, tiny sizes, the torch backend standing in for cuda/fla, Lightning's default strategy "
            "standing in for DeepSpeed; CUDA-only sections skipped. Numbers here say nothing about GPU speed.") \
        if dry_run else "FULL: one CUDA GPU, real sizes."
    ran = [n for n, r in results.items() if r.status != "skipped"]
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
