"""End to end: train.py fine-tunes with --peft miss, merge_bone.py writes the result for the engines, and the merged
model computes what the base with the trained adapter computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import merge_bone
from src.model import RWKV6
from tests.export.conftest import TOKENS, logits_of
from tests.tiny import tiny_config, tiny_state_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_miss_then_merge_for_every_engine(tmp_path: Path) -> None:
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=65536)
    torch.save(tiny_state_dict(cfg, seed=5), tmp_path / "base.pth")
    lines = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a + b}"})
             for a in range(6) for b in range(4)]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    args = {"load_model": tmp_path / "base.pth", "data_file": tmp_path / "sft.jsonl", "data_type": "sft",
            "proj_dir": tmp_path / "run", "peft": "miss", "miss_r": 16, "ctx_len": 32, "micro_bsz": 4,
            "epoch_count": 1, "lr_init": 1e-2, "lr_final": 1e-2, "accelerator": "cpu", "precision": "fp32",
            "wkv_backend": "torch", "val_fraction": 0.1, "seed": 3}
    cmd = [sys.executable, "train.py"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = tmp_path / "run" / "adapter-final.safetensors"
    with torch.no_grad():
        model = RWKV6.from_checkpoint(tmp_path / "base.pth", adapter=adapter, wkv_backend="torch").eval()
        trained = model(torch.tensor([TOKENS]))[0]
    for out in ("merged.pth", "merged.gguf"):
        assert merge_bone.main(["--base_model", str(tmp_path / "base.pth"), "--bone", str(adapter), "--output",
                                str(tmp_path / out), "--dtype", "fp32"]) == 0
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert ((logits_of(merged) - trained).abs().max() / trained.abs().max()).item() < 1e-5
    assert ((logits_of(tiny_state_dict(cfg, seed=5)) - trained).abs().max() / trained.abs().max()).item() > 1e-4
    tensors = {t.name: t for t in GGUFReader(tmp_path / "merged.gguf").tensors}
    assert np.array_equal(tensors["blk.1.channel_mix_value.weight"].data, merged["blocks.1.ffn.value.weight"].numpy())
