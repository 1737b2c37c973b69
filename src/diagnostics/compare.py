"""The method comparison: PEFT methods fine-tuned from one tiny RWKV6 base with identical data order, steps and
learning rate, then scored and plotted. The CLI is `python -m scripts.compare_methods`
(`bash scripts/compare_methods.sh`).

Methods: LoRA and PiSSA (r = b/2), Bone-row and Bone-col (b), Bone-unconstrained and Bone-Hadamard (b, row
grouping), and Bone-row with every b in {16, 32, 64} that divides the model's sizes. Each is fine-tuned by
`train.py` in its own subprocess and proj_dir (<work>/seed<S>/<method>) from the same base, on the first
ceil(steps/epochs)·micro_bsz problems of the math word-problem training set for `epochs` epochs (validation loss
after every epoch on the next `val_problems` problems, never trained on), then scored by greedy exact match on
the held-out test problems. The base is the CPU demo's, pretrained first with the demo's command when missing;
`micro` settings build a random 2 x 128 base instead (a plumbing check).

Writes to `out`: comparison_train_loss.png (first steps zoomed, as the Bone paper's Figure 1, and the whole run),
comparison_val_loss.png, comparison_table.md (trainable parameters, final train/val loss, exact match, wall time,
peak RSS of the training process) and comparison_results.json. A method whose proj_dir already holds a finished
run made by the same command is not retrained.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from src.atomic import atomic_write_text
from src.errors import ConfigError, DataError, RWKVBoneError
from src.run_files import FINAL_TAG, read_loss_curves, weights_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = Path("runs/demo/data")
DEMO_BASE = weights_file("runs/demo/base", FINAL_TAG, full_model=True)
BLOCK_SIZES = (16, 32, 64)
RUN_RECORD = "compare_run.json"  # in each method's proj_dir: the command and cost of its finished run
TRAIN_PLOT, VAL_PLOT = "comparison_train_loss.png", "comparison_val_loss.png"
TABLE, RESULTS = "comparison_table.md", "comparison_results.json"


class ComparisonError(RWKVBoneError):
    """A step of the comparison itself failed (pretraining the base)."""


@dataclass(frozen=True)
class CompareSettings:
    """Everything a comparison depends on (written into comparison_results.json)."""

    out: str = "docs"
    work: str = "runs/compare"
    base: str = str(DEMO_BASE)
    data_dir: str = str(DEMO_DATA)
    steps: int = 120
    epochs: int = 3
    b: int = 32
    lr: float = 3e-3
    lr_final_ratio: float = 1 / 30
    micro_bsz: int = 8
    ctx_len: int = 48
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = None
    val_problems: int = 100
    eval_problems: int = 100
    max_new_tokens: int = 24
    jobs: int = 1
    timeout: float = 3600.0
    threads: int = 1
    micro: bool = False

    def as_micro(self) -> CompareSettings:
        """The plumbing check: a random 2 x 128 base built on the fly, 2 steps, 1 epoch, 2 problems scored."""
        return replace(self, micro=True, steps=2, epochs=1, micro_bsz=2, val_problems=4, eval_problems=2,
                       max_new_tokens=8)

    @property
    def problems_per_epoch(self) -> int:
        return math.ceil(self.steps / self.epochs) * self.micro_bsz


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    flags: tuple[str, ...]  # train.py adapter flags


@dataclass
class RunResult:
    method: str
    seed: int
    params: int = 0
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    exact_match: float = float("nan")
    correct: int = 0
    total: int = 0
    error: str = ""


def methods_for(b: int, n_embd: int, dim_ffn: int) -> tuple[list[Method], list[str]]:
    """(runnable methods, notes on skipped ones) for block size b on a model with these sizes."""
    r = b // 2
    lora = ("--lora_r", str(r), "--lora_alpha", str(r))

    def bone(peft: str, bb: int, grouping: str = "row") -> tuple[str, ...]:
        return ("--peft", peft, "--bone_b", str(bb), "--bone_grouping", grouping)

    methods = [
        Method("lora", f"LoRA r={r}", ("--peft", "lora", *lora)),
        Method("pissa", f"PiSSA r={r}", ("--peft", "pissa", *lora)),
        Method("bone-row", f"Bone-row b={b}", bone("bone", b)),
        Method("bone-col", f"Bone-col b={b}", bone("bone", b, "col")),
        Method("bone_unconstrained", f"Bone-unconstrained b={b}", bone("bone_unconstrained", b)),
        Method("bone_hadamard", f"Bone-Hadamard b={b}", bone("bone_hadamard", b)),
    ]
    methods += [Method(f"bone-row-b{bb}", f"Bone-row b={bb}", bone("bone", bb)) for bb in BLOCK_SIZES if bb != b]
    runnable, skipped = [], []
    for m in methods:
        bb = int(m.flags[m.flags.index("--bone_b") + 1]) if "--bone_b" in m.flags else None
        if bb is not None and (n_embd % bb or dim_ffn % bb):
            skipped.append(f"{m.label}: b={bb} does not divide n_embd={n_embd} and dim_ffn={dim_ffn}")
        else:
            runnable.append(m)
    return runnable, skipped


def adapter_config_of(method: Method):  # -> AdapterConfig
    """The AdapterConfig train.py builds from a method's flags."""
    from src.adapters.config import AdapterConfig

    flags = dict(zip(method.flags[::2], method.flags[1::2], strict=True))
    return AdapterConfig(method=flags["--peft"], b=int(flags.get("--bone_b", 64)),
                         grouping=flags.get("--bone_grouping", "row"), lora_r=int(flags.get("--lora_r", 32)),
                         lora_alpha=float(flags.get("--lora_alpha", 32)))


# ----------------------------------------------------------------------------------------------- processes
def run_logged(cmd: list[str], log: Path, timeout: float, env: Mapping[str, str]) -> tuple[int, float, float]:
    """Run cmd from the repository root with output to `log`; (exit code, wall seconds, peak RSS MiB of that
    process, from wait4). Killed after `timeout` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=dict(env), stdout=f, stderr=subprocess.STDOUT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


# ----------------------------------------------------------------------------------------------- the comparison
class Comparison:
    """One comparison run. `env` is the environment of every train.py process (the thread count and
    WANDB_MODE=disabled are set on top of it); `python` runs them."""

    def __init__(self, settings: CompareSettings, env: Mapping[str, str], python: str = sys.executable):
        self.s = settings
        self.work, self.out = Path(settings.work), Path(settings.out)
        self.python = python
        self.env = {**env, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0",
                    "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads)}

    # ------------------------------------------------------------------------------------------- data and base
    def prepare_data(self) -> dict[str, Path]:
        """The problem sets: generated (demo data, or a small set for micro), then split into the training
        subset, the validation problems and the test problems."""
        from src.data.demo import write_demo_data

        s = self.s
        data_dir = self.work / "data" if s.micro else Path(s.data_dir)
        if not (data_dir / "math_test.jsonl").is_file():
            sizes = {"corpus_docs": 4, "train": 16, "test": 4} if s.micro else {}
            write_demo_data(data_dir, **sizes)
        problems = (data_dir / "math_train.jsonl").read_text().splitlines()
        per_epoch = s.problems_per_epoch
        need = per_epoch + s.val_problems
        if len(problems) < need:
            raise DataError(f"{data_dir / 'math_train.jsonl'} has {len(problems)} problems; {need} are needed "
                            f"({per_epoch} to train on and {s.val_problems} to validate on)")
        split = self.work / "split"
        split.mkdir(parents=True, exist_ok=True)
        atomic_write_text(split / "train.jsonl", "\n".join(problems[:per_epoch]) + "\n")
        atomic_write_text(split / "val.jsonl", "\n".join(problems[per_epoch:need]) + "\n")
        return {"corpus": data_dir / "corpus.jsonl", "train": split / "train.jsonl", "val": split / "val.jsonl",
                "test": data_dir / "math_test.jsonl"}

    def ensure_base(self, data: dict[str, Path]) -> Path:
        """The base checkpoint: for micro a random 2 x 128 model with the World vocabulary built here; otherwise
        settings.base (the demo's), pretrained first with the demo's own command when it is missing."""
        if self.s.micro:
            from src.diagnostics.random_model import save_random_checkpoint
            from src.model import RWKV6Config

            base = weights_file(self.work / "base", FINAL_TAG, full_model=True)
            if not base.is_file():
                save_random_checkpoint(base, RWKV6Config(n_layer=2, n_embd=128, vocab_size=65536), seed=0)
            return base
        base = Path(self.s.base)
        if base.is_file():
            return base
        cmd = [self.python, "train.py", "--config", "configs/demo_pretrain.yaml", "--data_file",
               str(data["corpus"]), "--proj_dir", str(base.parent)]
        print(f"[compare] pretraining the base: {' '.join(cmd[1:])}", flush=True)
        log = self.work / "logs" / "base.log"
        code, took, _ = run_logged(cmd, log, self.s.timeout, self.env)
        if code != 0 or not base.is_file():
            raise ComparisonError(f"pretraining the base failed (exit {code}); log: {log}\n{tail(log)}")
        print(f"[compare] base ready in {took:.0f} s: {base}", flush=True)
        return base

    # ------------------------------------------------------------------------------------------- one run
    def train_command(self, method: Method, seed: int, base: Path, data: dict[str, Path], proj: Path) -> list[str]:
        s = self.s
        return [self.python, "train.py", "--load_model", str(base), "--data_file", str(data["train"]),
                "--data_type", "sft", "--val_file", str(data["val"]), "--proj_dir", str(proj), *method.flags,
                "--ctx_len", str(s.ctx_len), "--micro_bsz", str(s.micro_bsz), "--epoch_count", str(s.epochs),
                "--epoch_save", str(s.epochs), "--lr_init", str(s.lr), "--lr_final", str(s.lr * s.lr_final_ratio),
                "--lr_schedule", "cosine", "--warmup_steps", "0", "--accelerator", "cpu", "--precision", "fp32",
                "--wkv_backend", "torch", "--seed", str(seed), "--keep_last", "1", "--resume", "auto"]

    def train_one(self, method: Method, seed: int, base: Path, data: dict[str, Path]) -> RunResult:
        """Fine-tune one method (or reuse a finished run of the same command); read its metrics."""
        proj = self.work / f"seed{seed}" / method.name
        cmd = self.train_command(method, seed, base, data, proj)
        record = proj / RUN_RECORD
        adapter = weights_file(proj, FINAL_TAG)
        result = RunResult(method.name, seed)
        key = {"cmd": cmd[1:], "threads": self.s.threads}
        if record.is_file() and adapter.is_file() and {k: json.loads(record.read_text()).get(k) for k in key} == key:
            saved = json.loads(record.read_text())
            result.wall_s, result.peak_rss_mib = saved["wall_s"], saved["peak_rss_mib"]
            print(f"[compare] {method.name} seed {seed}: reusing the finished run in {proj}", flush=True)
        else:
            if proj.exists() and not record.is_file():
                print(f"[compare] {method.name} seed {seed}: {proj} holds an unfinished run; train.py resumes it",
                      flush=True)
            code, result.wall_s, result.peak_rss_mib = run_logged(cmd, proj / "train.log", self.s.timeout, self.env)
            if code != 0 or not adapter.is_file():
                result.error = f"train.py exited with {code}: {tail(proj / 'train.log', 5)}"
                print(f"[compare] {method.name} seed {seed}: FAILED (exit {code}), log {proj / 'train.log'}",
                      flush=True)
                return result
            atomic_write_text(record, json.dumps({**key, "wall_s": result.wall_s,
                                                  "peak_rss_mib": result.peak_rss_mib}))
            print(f"[compare] {method.name} seed {seed}: trained in {result.wall_s:.0f} s", flush=True)
        train, val = read_loss_curves(proj)
        result.train_steps, result.train_loss = list(train), list(train.values())
        result.val_steps, result.val_loss = list(val), list(val.values())
        return result

    def exact_match(self, base: Path, adapter: Path | None, data: dict[str, Path]) -> tuple[float, int, int]:
        """Greedy exact match of base (+ adapter) on the first eval_problems test problems."""
        from src.data.tokenizer import WorldTokenizer
        from src.evaluation.evaluate import PROMPT_FORMAT, evaluate_exact_match, read_problems
        from src.model import RWKV6

        problems = read_problems(data["test"])[: self.s.eval_problems]
        model = RWKV6.from_checkpoint(base, adapter=adapter, wkv_backend="torch").eval()
        em = evaluate_exact_match(model, WorldTokenizer(), problems, PROMPT_FORMAT, self.s.max_new_tokens,
                                  progress=False)
        return em.accuracy, em.correct, em.total

    def base_val_loss(self, base: Path, data: dict[str, Path]) -> float:
        from src.evaluation.evaluate import held_out_loss
        from src.model import RWKV6

        model = RWKV6.from_checkpoint(base, wkv_backend="torch").eval()
        return held_out_loss(model, data["val"], self.s.ctx_len, 8)

    # ------------------------------------------------------------------------------------------- all of it
    def run(self) -> list[RunResult]:
        """Train, score and write every output; the results of every (method, seed)."""
        import torch

        from src.adapters.inject import count_adapter_parameters
        from src.checkpoint import load_tensors
        from src.model import RWKV6Config

        s = self.s
        torch.set_num_threads(s.threads)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        data = self.prepare_data()
        base = self.ensure_base(data)
        mcfg = RWKV6Config.from_state_dict(load_tensors(base))
        methods, skipped = methods_for(s.b, mcfg.n_embd, int(mcfg.dim_ffn or 0))
        if s.methods:
            unknown = sorted(set(s.methods) - {m.name for m in methods})
            if unknown:
                raise ConfigError(f"unknown or skipped methods {unknown}; available: {[m.name for m in methods]}")
            methods = [m for m in methods if m.name in s.methods]

        jobs = [(m, seed) for seed in s.seeds for m in methods]
        with ThreadPoolExecutor(max_workers=s.jobs) as pool:
            results = list(pool.map(lambda job: self.train_one(job[0], job[1], base, data), jobs))

        for (m, _), r in zip(jobs, results, strict=True):
            if r.error:
                continue
            r.params = count_adapter_parameters(mcfg, adapter_config_of(m))
            adapter = weights_file(self.work / f"seed{r.seed}" / m.name, FINAL_TAG)
            r.exact_match, r.correct, r.total = self.exact_match(base, adapter, data)
            print(f"[compare] {m.name} seed {r.seed}: exact match {r.correct}/{r.total}, "
                  f"val loss {r.val_loss[-1] if r.val_loss else float('nan'):.4f}", flush=True)
        em, _, total = self.exact_match(base, None, data)
        base_row = {"val_loss": self.base_val_loss(base, data), "exact_match": em, "total": total}

        table = make_table(methods, results, base_row, s, skipped)
        atomic_write_text(self.out / TABLE, table)
        atomic_write_text(self.out / RESULTS, json.dumps(
            {"args": asdict(s), "base": str(base), "base_row": base_row, "skipped": skipped,
             "methods": [asdict(m) for m in methods], "runs": [asdict(r) for r in results]}, indent=1))
        plot_curves(methods, results, base_row["val_loss"], self.out)
        print(table)
        print(f"[compare] wrote {self.out / TABLE}, {TRAIN_PLOT}, {VAL_PLOT}, {RESULTS}")
        return results


# ----------------------------------------------------------------------------------------------- outputs
def mean_sd(values: list[float], fmt: str) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def final_train_loss(r: RunResult) -> float:
    """Mean training loss of the last 10% of steps (at least one): single steps are noisy."""
    if not r.train_loss:
        return float("nan")
    k = max(1, len(r.train_loss) // 10)
    return statistics.mean(r.train_loss[-k:])


def make_table(methods: list[Method], results: list[RunResult], base_row: dict[str, float], s: CompareSettings,
               skipped: list[str]) -> str:
    seeds = sorted({r.seed for r in results})
    k_note = "mean of the last 10% of steps"
    lines = [f"| method | trainable params | final train loss ({k_note}) | final val loss | exact match "
             f"(greedy, {base_row['total']:.0f} test problems) | wall time s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| base, not fine-tuned | 0 | n/a | {base_row['val_loss']:.4f} | {base_row['exact_match']:.1%} | "
             f"n/a | n/a |"]
    for m in methods:
        ok = [r for r in results if r.method == m.name and not r.error]
        if not ok:
            lines.append(f"| {m.label} | n/a | FAILED | FAILED | FAILED | n/a | n/a |")
            continue
        lines.append(
            f"| {m.label} | {ok[0].params:,} | {mean_sd([final_train_loss(r) for r in ok], '.4f')} | "
            f"{mean_sd([r.val_loss[-1] if r.val_loss else float('nan') for r in ok], '.4f')} | "
            f"{mean_sd([r.exact_match * 100 for r in ok], '.1f')}% | {mean_sd([r.wall_s for r in ok], '.0f')} | "
            f"{mean_sd([r.peak_rss_mib for r in ok], '.0f')} |")
    shared = f", with {s.jobs} runs at a time" if s.jobs > 1 else ""
    notes = [f"Seeds: {', '.join(map(str, seeds))} ({'mean ± sd' if len(seeds) > 1 else 'one seed'}). "
             f"{s.steps} steps requested: {s.epochs} epoch(s) over {s.problems_per_epoch} problems, micro_bsz "
             f"{s.micro_bsz}, ctx_len {s.ctx_len}, lr {s.lr:g} -> {s.lr * s.lr_final_ratio:g} cosine, "
             f"fp32 on CPU, {s.threads} thread(s) per run. Wall time and peak RSS are of the whole train.py process "
             f"(startup and validation included){shared}."]
    notes += [f"Skipped: {note}." for note in skipped]
    notes += [f"FAILED: {r.method} seed {r.seed}: {r.error}" for r in results if r.error]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def mean_curve(rs: list[RunResult], kind: str) -> tuple[list[int], list[float]]:
    """The steps every successful run has a `kind` ("train" or "val") loss at, and the mean loss there."""
    curves = [dict(zip(getattr(r, f"{kind}_steps"), getattr(r, f"{kind}_loss"), strict=True))
              for r in rs if not r.error]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.mean(c[s] for c in curves) for s in steps]


def _loss_axes(ax, title: str) -> None:  # ax: matplotlib Axes
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)


def plot_curves(methods: list[Method], results: list[RunResult], base_val: float, out: Path) -> None:
    """TRAIN_PLOT (the first steps zoomed beside the whole run, smoothed) and VAL_PLOT (from the base's loss at
    step 0) in `out`, one colour per method."""
    from matplotlib import colormaps

    from src.plotting import moving_average, new_figure, save_figure

    colors = colormaps["tab10"]
    fig, (zoom, full) = new_figure(ncols=2, figsize=(13, 4.8))
    for i, m in enumerate(methods):
        steps, loss = mean_curve([r for r in results if r.method == m.name], "train")
        if not steps:
            continue
        n_zoom = max(10, len(steps) // 5)
        zoom.plot(steps[:n_zoom], loss[:n_zoom], color=colors(i), lw=1.4, label=m.label)
        window = max(1, len(steps) // 25)
        full.plot(steps, moving_average(loss, window), color=colors(i), lw=1.2, label=m.label)
    _loss_axes(zoom, "training loss, first steps")
    _loss_axes(full, "training loss, whole run (moving average)")
    full.legend(fontsize=8)
    save_figure(fig, out / TRAIN_PLOT)

    fig, ax = new_figure(figsize=(7.5, 4.8))
    for i, m in enumerate(methods):
        steps, loss = mean_curve([r for r in results if r.method == m.name], "val")
        if steps:
            ax.plot([0, *steps], [base_val, *loss], "o-", color=colors(i), lw=1.2, ms=4, label=m.label)
    _loss_axes(ax, "validation loss (step 0: the base model)")
    ax.legend(fontsize=8)
    save_figure(fig, out / VAL_PLOT)
