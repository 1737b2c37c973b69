"""Merging: merged logits equal unmerged ones (random adapters), unmerge restores the base, streaming
file merges (.pth/.safetensors) equal the in-memory merge, the `rwkv` package loads merged files, and the
merge_bone.py / merge_bone.sh command lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_bone
from src.adapters.config import AdapterConfig
from src.adapters.export import merge_checkpoint_file
from src.adapters.inject import adapter_state_dict, save_adapter
from src.adapters.merge import merge_state_dict, unmerge_state_dict
from src.checkpoint import save_tensors
from src.errors import AdapterError
from src.model import RWKV6
from tests.adapters.reference import (
    ALL_METHOD_CONFIGS,
    adapted_model,
    config_id,
    naive_block_affine,
    naive_lora,
    rel_err,
    tiny_base,
    tiny_model,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENS = [5, 17, 200, 3, 99, 42, 0, 7, 130, 255, 1, 64, 12, 88]
IDX = torch.tensor([TOKENS])


def model_from(sd: dict[str, torch.Tensor]) -> RWKV6:
    model = tiny_model()
    model.load_base_state_dict(sd)
    return model.eval()


@pytest.mark.parametrize("cfg", ALL_METHOD_CONFIGS + [AdapterConfig(b=32, train_parts=("ln", "time"))],
                         ids=lambda c: config_id(c) + ("+parts" if c.train_parts else ""))
def test_merged_logits_equal_unmerged_logits(cfg: AdapterConfig) -> None:
    adapted = adapted_model(cfg, random_seed=11)
    base = dict(tiny_base(0, torch.float32, 2))
    merged_sd = merge_state_dict(base, adapter_state_dict(adapted, cfg), cfg)
    with torch.no_grad():
        unmerged = adapted(IDX)
        merged = model_from(merged_sd)(IDX)
    assert rel_err(merged, unmerged) < 1e-5
    assert rel_err(merged, model_from(base)(IDX)) > 1e-3  # the adapter does change the model
    # merge_state_dict agrees with the naive formulas, weight by weight
    tensors = adapter_state_dict(adapted, cfg)
    key = "blocks.1.ffn.value"
    own = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(key + ".")}
    if cfg.method.startswith("bone"):
        naive = naive_block_affine(base[f"{key}.weight"].double(), {k: v.double() for k, v in own.items()},
                                   cfg.method, cfg.grouping)
    else:
        naive = naive_lora(base[f"{key}.weight"].double(), {k: v.double() for k, v in own.items()},
                           cfg.lora_scaling, cfg.method == "pissa")
    assert rel_err(merged_sd[f"{key}.weight"].double(), naive) < 1e-6
    assert rel_err(adapted.get_submodule(key).merged_weight(), merged_sd[f"{key}.weight"]) < 1e-5


@pytest.mark.parametrize("cfg", ALL_METHOD_CONFIGS, ids=config_id)
def test_merge_then_unmerge_restores_the_base(cfg: AdapterConfig) -> None:
    adapted = adapted_model(cfg, random_seed=12)
    tensors = adapter_state_dict(adapted, cfg)
    base = {k: v.double() for k, v in tiny_base(0, torch.float32, 2).items()}
    back = unmerge_state_dict(merge_state_dict(base, tensors, cfg), tensors, cfg)
    for k in base:
        assert rel_err(back[k], base[k]) < 1e-12, k
    base32 = dict(tiny_base(0, torch.float32, 2))
    back32 = unmerge_state_dict(merge_state_dict(base32, tensors, cfg), tensors, cfg)
    assert max(rel_err(back32[k], base32[k]) for k in base32) < 1e-5


def test_unmerge_refuses_adapters_with_trained_parts() -> None:
    cfg = AdapterConfig(b=32, train_parts=("ln",))
    tensors = adapter_state_dict(adapted_model(cfg, random_seed=1), cfg)
    merged = merge_state_dict(dict(tiny_base(0, torch.float32, 2)), tensors, cfg)
    with pytest.raises(AdapterError, match="original values"):
        unmerge_state_dict(merged, tensors, cfg)


def official_logits(path: Path) -> torch.Tensor:
    """All-position logits from BlinkDL's `rwkv` package (pure-torch CPU fp32 path)."""
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_V7_ON"] = "0"
    from rwkv.model import RWKV as OfficialRWKV

    model = OfficialRWKV(model=str(path), strategy="cpu fp32", verbose=False)
    out, _ = model.forward(TOKENS, None, full_output=True)
    return out.float()


@pytest.mark.parametrize("cfg", [AdapterConfig(b=32), AdapterConfig(b=32, grouping="col"),
                                 AdapterConfig(method="pissa", lora_r=8, lora_alpha=16)], ids=config_id)
def test_merged_file_equals_in_memory_merge_and_loads_in_rwkv_package(tmp_path: Path, cfg: AdapterConfig) -> None:
    adapted = adapted_model(cfg, random_seed=13)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapted, cfg, adapter)
    base = tmp_path / "base.pth"
    torch.save(dict(tiny_base(0, torch.float32, 2)), base)
    expected = merge_state_dict(dict(tiny_base(0, torch.float32, 2)), adapter_state_dict(adapted, cfg), cfg)

    for out in (tmp_path / "merged.pth", tmp_path / "merged.safetensors"):
        summary = merge_checkpoint_file(base, adapter, out)
        assert len(summary.changed) == 16
        sd = load_file(str(out)) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
        assert sd.keys() == expected.keys()
        assert all(torch.equal(sd[k], expected[k]) for k in sd), out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary files are gone

    with torch.no_grad():
        ours = adapted(IDX)[0]
    ref = official_logits(tmp_path / "merged.pth")
    assert rel_err(ref, ours) < 1e-4


def test_streaming_merge_keeps_bf16_and_unmerges(tmp_path: Path) -> None:
    cfg = AdapterConfig(b=32)
    adapted = adapted_model(cfg, random_seed=14)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapted, cfg, adapter)
    base16 = {k: v.bfloat16() for k, v in tiny_base(0, torch.float32, 2).items()}
    base = tmp_path / "base.safetensors"
    save_tensors(base, base16)
    merge_checkpoint_file(base, adapter, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    assert torch.equal(merged["blocks.0.att.key.weight"],
                       merge_state_dict(base16, adapter_state_dict(adapted, cfg), cfg)["blocks.0.att.key.weight"])
    merge_checkpoint_file(tmp_path / "merged.safetensors", adapter, tmp_path / "restored.pth", unmerge=True)
    restored = torch.load(tmp_path / "restored.pth", weights_only=True)
    # bf16 storage: the round trip is only as good as bf16 rounding
    assert max(rel_err(restored[k].float(), base16[k].float()) for k in base16) < 2e-2


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, Path, AdapterConfig]:
    cfg = AdapterConfig(b=32)
    base = tmp_path / "base.pth"
    torch.save(dict(tiny_base(0, torch.float32, 2)), base)
    proj = tmp_path / "proj"
    for seed, name in ((1, "adapter-epoch2"), (2, "adapter-epoch10"), (3, "adapter-epoch9")):
        save_adapter(adapted_model(cfg, random_seed=seed), cfg, proj / f"{name}.safetensors")
    return proj, base, cfg


def test_cli_merges_and_refuses_bad_input_with_one_line(run_dir: tuple[Path, Path, AdapterConfig],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    proj, base, _ = run_dir
    adapter = proj / "adapter-epoch2.safetensors"
    assert merge_bone.main(["--base_model", str(base), "--bone", str(adapter), "--output", str(proj / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "merged bone (b=32, grouping=row) into 16 tensors" in out and "att.key x2" in out

    other = proj.parent / "other.pth"
    torch.save(dict(tiny_base(0, torch.float32, 3)), other)
    code = merge_bone.main(["--base_model", str(other), "--bone", str(adapter), "--output", str(proj / "x.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "different base" in err and "n_layer=3" in err
    assert not (proj / "x.pth").exists()

    link = proj / "link.pth"
    link.symlink_to(base)
    before = base.read_bytes()
    for output in (link, adapter, base.parent / "." / base.name):
        assert merge_bone.main(["--base_model", str(base), "--bone", str(adapter), "--output", str(output)]) == 2
        assert "same file" in capsys.readouterr().err
    assert base.read_bytes() == before

    # the real entry point: exit code 2 and one line, no traceback
    same = subprocess.run([sys.executable, "merge_bone.py", "--base_model", str(base), "--bone", str(adapter),
                           "--output", str(base)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert same.returncode == 2
    assert same.stderr.count("\n") == 1 and "same file" in same.stderr and "Traceback" not in same.stderr


def test_merge_script_picks_final_else_highest_epoch(run_dir: tuple[Path, Path, AdapterConfig]) -> None:
    proj, base, cfg = run_dir

    def merged_with(out: Path) -> str:
        result = subprocess.run(["bash", "scripts/merge_bone.sh", str(proj), str(base), str(out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[0]

    assert merged_with(proj / "a.pth").endswith("adapter-epoch10.safetensors")
    save_adapter(adapted_model(cfg, random_seed=4), cfg, proj / "adapter-final.safetensors")
    assert merged_with(proj / "b.pth").endswith("adapter-final.safetensors")
    expected = merge_state_dict(dict(tiny_base(0, torch.float32, 2)),
                                load_file(str(proj / "adapter-final.safetensors")), cfg)
    got = torch.load(proj / "b.pth", weights_only=True)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    empty = subprocess.run(["bash", "scripts/merge_bone.sh", str(proj.parent / "nothing"), str(base), "o.pth"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no adapter-final" in empty.stderr
