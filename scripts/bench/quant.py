"""Quantised frozen base (--quant): memory, step time and quality, bf16 vs int8 vs nf4 side by side.

    python -m scripts.bench.quant [--n_layer 8 --n_embd 1024 --vocab 4096] [--steps 150]

memory   each load runs in a child process (MALLOC_MMAP_THRESHOLD_=65536, as long_context.py): the model's own
         bytes (projection weights incl. quantisation state; everything), and the anonymous RSS the load leaves
         held and its peak while loading (sampled every 0.5 ms; memory-mapped checkpoint pages are file-backed and
         not counted: they are page cache the kernel can drop).
speed    forward + backward of Bone-row (b=64) on a bf16 base vs the quantised bases, CPU, bf16, median of steps.
quality  a synthetic next-token task (affine sequences mod V) on a small random base: Bone-row fine-tuned for
         --steps on each base (fp32 math), held-out loss on its own base; then the nf4-trained adapter merged onto
         the original fp32 base and onto the dequantised base, held-out loss of each dense merged model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from src.adapters.config import PROJECTIONS, AdapterConfig
from src.adapters.inject import adapter_parameters, adapter_state_dict, inject_adapters
from src.adapters.merge import merge_weight
from src.checkpoint import save_tensors
from src.diagnostics.random_model import random_state_dict
from src.model import RWKV6, RWKV6Config, base_state_dict
from src.quant import quantize_dequantize

BASES = ("bf16", "int8", "nf4")
CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from src.model import RWKV6
from src.quant import QuantWeight
quant = None if sys.argv[2] == "bf16" else sys.argv[2]
if quant:
    QuantWeight.from_weight(torch.randn(64, 64), quant).matmul(torch.randn(2, 64))
RWKV6.from_checkpoint(sys.argv[3], dtype=torch.bfloat16, quant=quant)
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]; stop = [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.0005)
before = anon(); t = threading.Thread(target=watch); t.start()
model = RWKV6.from_checkpoint(sys.argv[1], dtype=torch.bfloat16, quant=quant)
stop[0] = True; t.join()
held = anon() - before
proj = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantWeight))
if not quant:
    proj = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.rpartition(".")[0].split(".", 2)[-1] in PROJECTIONS_HERE)
total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"proj_bytes": proj, "model_bytes": total, "held": held, "peak": max(peak[0], anon()) - before}))
""".replace("PROJECTIONS_HERE", repr(PROJECTIONS))


def memory(args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    cfg = RWKV6Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab, wkv_backend="torch")
    path, small = tmp / "base.pth", tmp / "small.pth"
    save_tensors(path, random_state_dict(cfg, kind="fast_random", dtype=torch.bfloat16))
    save_tensors(small, random_state_dict(RWKV6Config(n_layer=1, n_embd=64, vocab_size=64), dtype=torch.bfloat16))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for base in BASES:
        res = subprocess.run([sys.executable, "-c", CHILD, str(path), base, str(small)], env=env, check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        out[base] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def step_times(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    cfg = RWKV6Config(n_layer=4, n_embd=512, vocab_size=1024, wkv_backend="torch")
    path = tmp / "speed.pth"
    save_tensors(path, random_state_dict(cfg, kind="fast_random", dtype=torch.bfloat16))
    acfg = AdapterConfig(method="bone", b=64)
    idx = torch.randint(0, 1024, (2, args.ctx))
    out = {}
    for base in BASES:
        model = RWKV6.from_checkpoint(path, dtype=torch.bfloat16, quant=None if base == "bf16" else base)
        inject_adapters(model, acfg)
        times = []
        for _ in range(args.speed_steps + 1):
            start = time.perf_counter()
            model(idx).float().logsumexp(-1).mean().backward()
            times.append(time.perf_counter() - start)
        out[base] = statistics.median(times[1:])
    return out


def synthetic(n: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(1, 8, (n, 1), generator=gen)
    b = torch.randint(0, vocab, (n, 1), generator=gen)
    return (b + a * torch.arange(t)) % vocab  # x_{i+1} = x_i + a (mod V): the step is in the first two tokens


def loss_of(model: RWKV6, data: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(data[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten()).item()


def quality(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    cfg = RWKV6Config(n_layer=2, n_embd=256, vocab_size=128, wkv_backend="torch")
    path = tmp / "quality.pth"
    save_tensors(path, random_state_dict(cfg, seed=1))
    train, held = synthetic(512, 33, 128, 0), synthetic(64, 33, 128, 1)
    acfg = AdapterConfig(method="bone", b=64)
    out: dict[str, float] = {}
    trained: dict[str, dict] = {}
    for base in BASES:
        quant = None if base == "bf16" else base
        # fp32 math on every base: the comparison is about the frozen weights, not the matmul precision
        model = RWKV6.from_checkpoint(path, dtype=torch.float32, quant=quant)
        if base == "bf16":  # the bf16 base: weights rounded to bf16
            with torch.no_grad():
                for t in base_state_dict(model).values():
                    t.copy_(t.bfloat16().float())
        out[f"{base} base before"] = loss_of(model, held)
        inject_adapters(model, acfg)
        opt = torch.optim.Adam(adapter_parameters(model, acfg).values(), lr=args.lr)
        gen = torch.Generator().manual_seed(2)
        for _ in range(args.steps):
            batch = train[torch.randint(0, len(train), (16,), generator=gen)]
            loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[f"{base} base after"] = loss_of(model, held)
        trained[base] = {k: v.detach().clone() for k, v in adapter_state_dict(model, acfg).items()}
    for target in ("original", "dequantised"):
        model = RWKV6.from_checkpoint(path, dtype=torch.float32)
        with torch.no_grad():
            for name, t in base_state_dict(model).items():
                prefix = name.rpartition(".")[0]
                per = {k.rpartition(".")[2]: v for k, v in trained["nf4"].items() if k.rpartition(".")[0] == prefix}
                if per:
                    w = t if target == "original" else quantize_dequantize(t, "nf4")
                    t.copy_(merge_weight(w, per, acfg))
        out[f"nf4 adapter merged onto {target} base"] = loss_of(model, held)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--speed_steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "speed", "quality"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "memory" not in args.skip:
            mem = memory(args, tmp)
            ref = mem["bf16"]
            print(f"memory (n_layer={args.n_layer}, n_embd={args.n_embd}, vocab={args.vocab}; MiB, ratio to bf16):")
            for base, m in mem.items():
                proj = m["proj_bytes"]
                print(f"  {base:5s} projections {proj / 2**20:8.1f} ({proj / ref['proj_bytes']:.3f}x)"
                      f"  model {m['model_bytes'] / 2**20:8.1f} ({m['model_bytes'] / ref['model_bytes']:.3f}x)"
                      f"  load held {m['held'] / 2**20:8.1f}  load peak {m['peak'] / 2**20:8.1f}")
        if "speed" not in args.skip:
            sp = step_times(args, tmp)
            print(f"Bone-row step, CPU bf16, 4x512 model, B=2 T={args.ctx} (s, ratio to bf16):")
            for base, s in sp.items():
                print(f"  {base:5s} {s:.3f} ({s / sp['bf16']:.2f}x)")
        if "quality" not in args.skip:
            q = quality(args, tmp)
            print(f"quality: Bone-row b=64, {args.steps} steps, held-out loss:")
            for k, v in q.items():
                print(f"  {k:40s} {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
