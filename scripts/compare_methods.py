"""Compare PEFT methods on the demo's tiny RWKV6 base: identical data order, steps and learning rate.

    python scripts/compare_methods.py [--steps 120 --epochs 3 --b 32 --seeds 0 --out docs]
    python scripts/compare_methods.py --micro --work /tmp/cmp --out /tmp/cmp/out      # 2-step plumbing check

Methods: LoRA and PiSSA (r = b/2), Bone-row and Bone-col (b), Bone-unconstrained and Bone-Hadamard (b, row
grouping), and Bone-row with every b in {16, 32, 64} that divides the model's sizes. Each is fine-tuned by
`train.py` in its own subprocess and proj_dir (<work>/seed<S>/<method>) from the same base, on the first
ceil(steps/epochs)·micro_bsz problems of the math word-problem training set for --epochs epochs (validation
loss after every epoch on the next --val_problems problems, never trained on), then scored by greedy exact match
on the held-out test problems (src.evaluate). The base is the CPU demo's (runs/demo/base/model-final.safetensors),
pretrained here first with the demo's command when missing; --micro builds a random 2 x 128 base instead.

Writes to --out: comparison_train_loss.png (first steps zoomed, as the Bone paper's Figure 1, and the whole run),
comparison_val_loss.png, comparison_table.md (trainable parameters, final train/val loss, exact match, wall time,
peak RSS of the training process) and comparison_results.json. A method whose proj_dir already holds a finished
run made by the same command is not retrained.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from src.atomic import atomic_path, atomic_write_text  # noqa: E402

DEMO_DATA = Path("runs/demo/data")
DEMO_BASE = Path("runs/demo/base/model-final.safetensors")
BLOCK_SIZES = (16, 32, 64)


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
    methods = [
        Method("lora", f"LoRA r={r}", ("--peft", "lora", *lora)),
        Method("pissa", f"PiSSA r={r}", ("--peft", "pissa", *lora)),
        Method("bone-row", f"Bone-row b={b}", ("--peft", "bone", "--bone_b", str(b), "--bone_grouping", "row")),
        Method("bone-col", f"Bone-col b={b}", ("--peft", "bone", "--bone_b", str(b), "--bone_grouping", "col")),
        Method("bone_unconstrained", f"Bone-unconstrained b={b}",
               ("--peft", "bone_unconstrained", "--bone_b", str(b), "--bone_grouping", "row")),
        Method("bone_hadamard", f"Bone-Hadamard b={b}",
               ("--peft", "bone_hadamard", "--bone_b", str(b), "--bone_grouping", "row")),
    ]
    methods += [Method(f"bone-row-b{bb}", f"Bone-row b={bb}",
                       ("--peft", "bone", "--bone_b", str(bb), "--bone_grouping", "row"))
                for bb in BLOCK_SIZES if bb != b]
    runnable, skipped = [], []
    for m in methods:
        bb = int(m.flags[m.flags.index("--bone_b") + 1]) if "--bone_b" in m.flags else None
        if bb is not None and (n_embd % bb or dim_ffn % bb):
            skipped.append(f"{m.label}: b={bb} does not divide n_embd={n_embd} and dim_ffn={dim_ffn}")
        else:
            runnable.append(m)
    return runnable, skipped


# ----------------------------------------------------------------------------------------------- processes
def run_logged(cmd: list[str], log: Path, timeout: float, threads: int) -> tuple[int, float, float]:
    """Run cmd with output to `log` and `threads` torch CPU threads; (exit code, wall seconds, peak RSS MiB of
    that process, from wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
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


# ----------------------------------------------------------------------------------------------- data and base
def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The problem sets: generated (demo data, or a small set for --micro), then split into the training
    subset, the validation problems and the test problems."""
    data_dir = work / "data" if args.micro else Path(args.data_dir)
    if not (data_dir / "math_test.jsonl").is_file():
        make = importlib.import_module("scripts.make_demo_data")
        extra = ["--corpus_docs", "4", "--train", "16", "--test", "4"] if args.micro else []
        make.main(["--out", str(data_dir), *extra])
    problems = (data_dir / "math_train.jsonl").read_text().splitlines()
    per_epoch = math.ceil(args.steps / args.epochs) * args.micro_bsz
    need = per_epoch + args.val_problems
    if len(problems) < need:
        raise SystemExit(f"{data_dir / 'math_train.jsonl'} has {len(problems)} problems; {need} are needed "
                         f"({per_epoch} to train on and {args.val_problems} to validate on)")
    split = work / "split"
    split.mkdir(parents=True, exist_ok=True)
    atomic_write_text(split / "train.jsonl", "\n".join(problems[:per_epoch]) + "\n")
    atomic_write_text(split / "val.jsonl", "\n".join(problems[per_epoch:need]) + "\n")
    return {"corpus": data_dir / "corpus.jsonl", "train": split / "train.jsonl", "val": split / "val.jsonl",
            "test": data_dir / "math_test.jsonl"}


def micro_base(path: Path, seed: int = 0) -> None:
    """A random 2 x 128 x060 checkpoint with the World vocabulary: the project's init plus small noise on every
    tensor (the init zeroes the output projections, which would make PiSSA's SVD degenerate)."""
    from src.checkpoint import save_tensors
    from src.model import RWKV6, RWKV6Config, base_state_dict

    model = RWKV6(RWKV6Config(n_layer=2, n_embd=128, vocab_size=65536, wkv_backend="torch"))
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    save_tensors(path, base_state_dict(model))


def ensure_base(args: argparse.Namespace, work: Path, data: dict[str, Path]) -> Path:
    """The base checkpoint: for --micro a random 2 x 128 model built here; otherwise --base (the demo's),
    pretrained first with the demo's own command when it is missing."""
    if args.micro:
        base = work / "base" / "model-final.safetensors"
        if not base.is_file():
            micro_base(base)
        return base
    base = Path(args.base)
    if base.is_file():
        return base
    cmd = [sys.executable, "train.py", "--config", "configs/demo_pretrain.yaml", "--data_file", str(data["corpus"]),
           "--proj_dir", str(base.parent)]
    print(f"[compare] pretraining the base: {' '.join(cmd[1:])}", flush=True)
    code, took, _ = run_logged(cmd, work / "logs" / "base.log", args.timeout, args.threads)
    if code != 0 or not base.is_file():
        raise SystemExit(f"pretraining the base failed (exit {code}); log: {work / 'logs' / 'base.log'}\n"
                         f"{tail(work / 'logs' / 'base.log')}")
    print(f"[compare] base ready in {took:.0f} s: {base}", flush=True)
    return base


# ----------------------------------------------------------------------------------------------- one run
def train_command(args: argparse.Namespace, method: Method, seed: int, base: Path, data: dict[str, Path],
                  proj: Path) -> list[str]:
    return [sys.executable, "train.py", "--load_model", str(base), "--data_file", str(data["train"]),
            "--data_type", "sft", "--val_file", str(data["val"]), "--proj_dir", str(proj), *method.flags,
            "--ctx_len", str(args.ctx_len), "--micro_bsz", str(args.micro_bsz), "--epoch_count", str(args.epochs),
            "--epoch_save", str(args.epochs), "--lr_init", str(args.lr),
            "--lr_final", str(args.lr * args.lr_final_ratio),
            "--lr_schedule", "cosine", "--warmup_steps", "0", "--accelerator", "cpu", "--precision", "fp32",
            "--wkv_backend", "torch", "--seed", str(seed), "--keep_last", "1", "--resume", "auto"]


def train_one(args: argparse.Namespace, method: Method, seed: int, base: Path, data: dict[str, Path],
              work: Path) -> RunResult:
    """Fine-tune one method (or reuse a finished run of the same command); read its metrics."""
    proj = work / f"seed{seed}" / method.name
    cmd = train_command(args, method, seed, base, data, proj)
    record = proj / "compare_run.json"
    adapter = proj / "adapter-final.safetensors"
    result = RunResult(method.name, seed)
    key = {"cmd": cmd[1:], "threads": args.threads}
    if record.is_file() and adapter.is_file() and {k: json.loads(record.read_text()).get(k) for k in key} == key:
        saved = json.loads(record.read_text())
        result.wall_s, result.peak_rss_mib = saved["wall_s"], saved["peak_rss_mib"]
        print(f"[compare] {method.name} seed {seed}: reusing the finished run in {proj}", flush=True)
    else:
        if proj.exists() and not record.is_file():
            print(f"[compare] {method.name} seed {seed}: {proj} holds an unfinished run; train.py resumes it",
                  flush=True)
        code, result.wall_s, result.peak_rss_mib = run_logged(cmd, proj / "train.log", args.timeout, args.threads)
        if code != 0 or not adapter.is_file():
            result.error = f"train.py exited with {code}: {tail(proj / 'train.log', 5)}"
            print(f"[compare] {method.name} seed {seed}: FAILED (exit {code}), log {proj / 'train.log'}", flush=True)
            return result
        atomic_write_text(record, json.dumps({**key, "wall_s": result.wall_s, "peak_rss_mib": result.peak_rss_mib}))
        print(f"[compare] {method.name} seed {seed}: trained in {result.wall_s:.0f} s", flush=True)
    rows = [json.loads(line) for line in (proj / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    result.train_steps, result.train_loss = list(train), list(train.values())
    result.val_steps, result.val_loss = list(val), list(val.values())
    return result


def evaluate_run(args: argparse.Namespace, base: Path, adapter: Path | None,
                 data: dict[str, Path]) -> tuple[float, int, int]:
    """Greedy exact match of base (+ adapter) on the first --eval_problems test problems."""
    from src.data.tokenizer import WorldTokenizer
    from src.evaluate import PROMPT_FORMAT, evaluate_exact_match
    from src.model import RWKV6

    eval_cli = importlib.import_module("scripts.eval")
    problems = eval_cli.read_problems(str(data["test"]))[: args.eval_problems]
    model = RWKV6.from_checkpoint(base, adapter=adapter, wkv_backend="torch").eval()
    em = evaluate_exact_match(model, WorldTokenizer(), problems, PROMPT_FORMAT, args.max_new_tokens, progress=False)
    return em.accuracy, em.correct, em.total


def base_val_loss(base: Path, data: dict[str, Path], ctx_len: int) -> float:
    eval_cli = importlib.import_module("scripts.eval")
    from src.model import RWKV6

    model = RWKV6.from_checkpoint(base, wkv_backend="torch").eval()
    return eval_cli.held_out_loss(model, str(data["val"]), ctx_len, 8)


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


def make_table(methods: list[Method], results: list[RunResult], base_row: dict[str, float], args: argparse.Namespace,
               skipped: list[str]) -> str:
    seeds = sorted({r.seed for r in results})
    k_note = "mean of the last 10% of steps"
    lines = [f"| method | trainable params | final train loss ({k_note}) | final val loss | exact match "
             f"(greedy, {base_row['total']:.0f} test problems) | wall time s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| base, not fine-tuned | 0 | n/a | {base_row['val_loss']:.4f} | {base_row['exact_match']:.1%} | "
             f"n/a | n/a |"]
    for m in methods:
        rs = [r for r in results if r.method == m.name]
        ok = [r for r in rs if not r.error]
        if not ok:
            lines.append(f"| {m.label} | n/a | FAILED | FAILED | FAILED | n/a | n/a |")
            continue
        lines.append(
            f"| {m.label} | {ok[0].params:,} | {mean_sd([final_train_loss(r) for r in ok], '.4f')} | "
            f"{mean_sd([r.val_loss[-1] if r.val_loss else float('nan') for r in ok], '.4f')} | "
            f"{mean_sd([r.exact_match * 100 for r in ok], '.1f')}% | {mean_sd([r.wall_s for r in ok], '.0f')} | "
            f"{mean_sd([r.peak_rss_mib for r in ok], '.0f')} |")
    subset = math.ceil(args.steps / args.epochs) * args.micro_bsz
    shared = f", with {args.jobs} runs at a time" if args.jobs > 1 else ""
    notes = [f"Seeds: {', '.join(map(str, seeds))} ({'mean ± sd' if len(seeds) > 1 else 'one seed'}). "
             f"{args.steps} steps requested: {args.epochs} epoch(s) over {subset} problems, micro_bsz "
             f"{args.micro_bsz}, ctx_len {args.ctx_len}, lr {args.lr:g} -> {args.lr * args.lr_final_ratio:g} cosine, "
             f"fp32 on CPU, {args.threads} thread(s) per run. Wall time and peak RSS are of the whole train.py process "
             f"(startup and validation included){shared}."]
    notes += [f"Skipped: {s}." for s in skipped]
    notes += [f"FAILED: {r.method} seed {r.seed}: {r.error}" for r in results if r.error]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _mean_curve(rs: list[RunResult], kind: str) -> tuple[list[int], list[float]]:
    curves = [dict(zip(getattr(r, f"{kind}_steps"), getattr(r, f"{kind}_loss"), strict=True))
              for r in rs if not r.error]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.mean(c[s] for c in curves) for s in steps]


def plot_curves(methods: list[Method], results: list[RunResult], base_val: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    fig, (zoom, full) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, m in enumerate(methods):
        steps, loss = _mean_curve([r for r in results if r.method == m.name], "train")
        if not steps:
            continue
        n_zoom = max(10, len(steps) // 5)
        zoom.plot(steps[:n_zoom], loss[:n_zoom], color=colors(i), lw=1.4, label=m.label)
        window = max(1, len(steps) // 25)
        smooth = [statistics.mean(loss[max(0, j - window + 1): j + 1]) for j in range(len(loss))]
        full.plot(steps, smooth, color=colors(i), lw=1.2, label=m.label)
    zoom.set_title("training loss, first steps")
    full.set_title("training loss, whole run (moving average)")
    for ax in (zoom, full):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    full.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "comparison_train_loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, m in enumerate(methods):
        steps, loss = _mean_curve([r for r in results if r.method == m.name], "val")
        if steps:
            ax.plot([0, *steps], [base_val, *loss], "o-", color=colors(i), lw=1.2, ms=4, label=m.label)
    ax.set_title("validation loss (step 0: the base model)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "comparison_val_loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs", help="folder for the figures, table and raw results")
    ap.add_argument("--work", default="runs/compare", help="folder for the runs (one proj_dir per method and seed)")
    ap.add_argument("--base", default=str(DEMO_BASE),
                    help="base checkpoint (pretrained with the demo's command if missing)")
    ap.add_argument("--data_dir", default=str(DEMO_DATA), help="demo data folder (generated if missing)")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per method (all epochs)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs over the training subset (one val point each)")
    ap.add_argument("--b", type=int, default=32, help="Bone block size; LoRA/PiSSA use r = b/2 (equal parameters)")
    ap.add_argument("--lr", type=float, default=1e-3, help="initial learning rate, the same for every method")
    ap.add_argument("--lr_final_ratio", type=float, default=0.1, help="final lr / initial lr (cosine)")
    ap.add_argument("--micro_bsz", type=int, default=8)
    ap.add_argument("--ctx_len", type=int, default=64, help="the demo problems are at most 53 tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    ap.add_argument("--val_problems", type=int, default=100)
    ap.add_argument("--eval_problems", type=int, default=100, help="test problems scored by exact match")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--jobs", type=int, default=1,
                    help="train.py runs at a time (wall time and memory are then shared)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per train.py run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per train.py run and for evaluation (OMP_NUM_THREADS); 1 keeps runs "
                         "comparable on a shared machine, where a busy core stalls every multi-threaded step")
    ap.add_argument("--micro", action="store_true", help="plumbing check: a random 2 x 128 base built on the fly, "
                                                         "2 steps, 1 epoch, 2 problems scored")
    args = ap.parse_args(argv)
    if args.micro:
        args.steps, args.epochs, args.micro_bsz, args.val_problems = 2, 1, 2, 4
        args.eval_problems, args.max_new_tokens = 2, 8
        if args.work == "runs/compare":
            args.work = "runs/compare_micro"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, work)
    base = ensure_base(args, work, data)

    from src.adapters.config import AdapterConfig
    from src.adapters.inject import count_adapter_parameters
    from src.checkpoint import load_tensors
    from src.model import RWKV6Config

    mcfg = RWKV6Config.from_state_dict(load_tensors(base))
    methods, skipped = methods_for(args.b, mcfg.n_embd, int(mcfg.dim_ffn or 0))
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in methods})
        if unknown:
            raise SystemExit(f"unknown or skipped methods {unknown}; available: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]

    jobs = [(m, s) for s in args.seeds for m in methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: train_one(args, job[0], job[1], base, data, work), jobs))

    for (m, _), r in zip(jobs, results, strict=True):
        if r.error:
            continue
        flags = dict(zip(m.flags[::2], m.flags[1::2], strict=True))
        acfg = AdapterConfig(method=flags["--peft"], b=int(flags.get("--bone_b", 64)),
                             grouping=flags.get("--bone_grouping", "row"), lora_r=int(flags.get("--lora_r", 32)),
                             lora_alpha=float(flags.get("--lora_alpha", 32)))
        r.params = count_adapter_parameters(mcfg, acfg)
        adapter = work / f"seed{r.seed}" / m.name / "adapter-final.safetensors"
        r.exact_match, r.correct, r.total = evaluate_run(args, base, adapter, data)
        print(f"[compare] {m.name} seed {r.seed}: exact match {r.correct}/{r.total}, "
              f"val loss {r.val_loss[-1] if r.val_loss else float('nan'):.4f}", flush=True)
    em, correct, total = evaluate_run(args, base, None, data)
    base_row = {"val_loss": base_val_loss(base, data, args.ctx_len), "exact_match": em, "total": total}

    table = make_table(methods, results, base_row, args, skipped)
    atomic_write_text(out / "comparison_table.md", table)
    atomic_write_text(out / "comparison_results.json", json.dumps(
        {"args": vars(args), "base": str(base), "base_row": base_row, "skipped": skipped,
         "methods": [asdict(m) for m in methods], "runs": [asdict(r) for r in results]}, indent=1))
    plot_curves(methods, results, base_row["val_loss"], out)
    print(table)
    print(f"[compare] wrote {out / 'comparison_table.md'}, comparison_train_loss.png, comparison_val_loss.png, "
          f"comparison_results.json")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
