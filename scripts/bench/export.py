"""Memory of merge_bone.py for every output format, side by side: the anonymous memory each export holds at its
peak, against the checkpoint's size.

    python -m scripts.bench.export [--n_layer 8 --n_embd 1024 --vocab 65536] [--dtype bf16]

A random bf16 checkpoint (official key names) and a Bone-row b=64 adapter with a trained initial state are
written once; then each export runs in a fresh child process that samples its anonymous resident memory (RssAnon
in /proc/self/status) every 2 ms from a thread and reports the peak growth over what the process held before
the export (imports, the interpreter, torch's one-time lazy imports). Memory-mapped checkpoint pages are
file-backed page cache, not anonymous, and are not counted. The base is a .pth like the official checkpoints. For
contrast the last row loads the whole checkpoint (torch.load) and merges in memory. Children run with
MALLOC_MMAP_THRESHOLD_=65536 (as scripts/bench/long_context.py), so freed blocks go back to the system instead of
the measurement following glibc's growing heap.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from src.adapters.config import AdapterConfig
from src.adapters.inject import expected_adapter_shapes, save_adapter
from src.checkpoint import save_tensors
from src.diagnostics.random_model import random_state_dict
from src.model import RWKV6Config

# (label, output name, --dtype)
RUNS = [("pth (today's streaming merge)", "out.pth", None), ("safetensors", "out.safetensors", None),
        ("gguf fp16", "out.gguf", "fp16"), ("gguf q8_0", "out_q8.gguf", "q8_0"), ("hf folder", "out_hf", None),
        ("ai00 .st", "out.st", None)]

CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
import gguf  # noqa: F401  (imported before the baseline, as merge_bone.py imports it)
from src.export.convert import export_model
from src.adapters.merge import merge_state_dict
from src.adapters.files import load_adapter_file
from src.checkpoint import load_tensors, save_tensors
from src.model import RWKV6, RWKV6Config
with torch.device("meta"):  # torch's one-time lazy imports on the meta device (~70 MiB, any model size)
    RWKV6(RWKV6Config(n_layer=1, n_embd=64, vocab_size=64))

def anon_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

base, adapter, out, dtype = sys.argv[1:5]
peak = start = anon_kib()
running = True
def sample():
    global peak
    while running:
        peak = max(peak, anon_kib())
        time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
if out == "in-memory":
    tensors, cfg, _ = load_adapter_file(adapter)
    save_tensors(sys.argv[5], merge_state_dict(load_tensors(base), tensors, cfg))
else:
    export_model(base, adapter, out, dtype=None if dtype == "-" else dtype)
seconds = time.perf_counter() - t0
running = False
thread.join()
peak = max(peak, anon_kib())
print(json.dumps({"peak_mib": (peak - start) / 1024, "seconds": seconds}))
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size


def run_child(base: Path, adapter: Path, out: str, dtype: str | None, extra: str = "") -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, "-c", CHILD, str(base), str(adapter), out, dtype or "-"] + ([extra] if extra else [])
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="checkpoint dtype")
    parser.add_argument("--keep", default=None, help="folder to work in and keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        return bench(args, Path(args.keep))
    with tempfile.TemporaryDirectory(prefix="export_bench.") as tmp:
        return bench(args, Path(tmp))


def bench(args: argparse.Namespace, work: Path) -> int:
    """Write a random checkpoint and adapter into `work`, export them every way and print the table."""
    cfg = RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    sd = random_state_dict(cfg, seed=0, dtype=dtype, kind="fast_random")
    base = work / "base.pth"
    save_tensors(base, sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    del sd
    acfg = AdapterConfig(method="bone", b=64, train_parts=("state",))
    gen = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(s, generator=gen) * 0.01 for k, s in expected_adapter_shapes(acfg, shapes).items()}
    adapter = work / "adapter.safetensors"
    save_adapter(tensors, acfg, adapter, base_shapes=shapes)
    ckpt_mib = base.stat().st_size / 2**20
    print(f"RWKV6 {args.n_layer} x {args.n_embd}, vocab {args.vocab}, {args.dtype} checkpoint of {ckpt_mib:.0f} MiB "
          f"(largest tensor {args.vocab * args.n_embd * dtype.itemsize / 2**20:.0f} MiB); Bone-row b=64 + initial "
          f"state; one thread. Peak anonymous memory growth of the export, and its ratio to the checkpoint size.\n")
    print("| output | peak anonymous memory (MiB) | / checkpoint | output size (MiB) | time (s) |")
    print("|---|---|---|---|---|")
    for label, name, out_dtype in RUNS:
        out = work / name
        row = run_child(base, adapter, str(out), out_dtype)
        print(f"| {label} | {row['peak_mib']:.0f} | {row['peak_mib'] / ckpt_mib:.2f} | {_size(out) / 2**20:.0f} | "
              f"{row['seconds']:.1f} |", flush=True)
    row = run_child(base, adapter, "in-memory", None, str(work / "in_memory.safetensors"))
    print(f"| (contrast) whole checkpoint loaded and merged in memory | {row['peak_mib']:.0f} | "
          f"{row['peak_mib'] / ckpt_mib:.2f} | {_size(work / 'in_memory.safetensors') / 2**20:.0f} | "
          f"{row['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
