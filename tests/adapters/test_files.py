"""Adapter files: round trip, strict loading onto a base, and clear errors for files that do not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from src.adapters.config import AdapterConfig
from src.adapters.files import load_adapter_file
from src.adapters.inject import adapter_state_dict, load_adapter_into, save_adapter
from src.checkpoint import save_tensors
from src.errors import AdapterError
from src.model import RWKV6, base_state_dict
from tests.adapters.reference import ALL_METHOD_CONFIGS, adapted_model, config_id, rel_err, tiny_base, tiny_model

IDX = torch.tensor([[5, 17, 200, 3, 99, 42, 0, 7, 130, 255, 1, 64]])


def base_file(tmp_path: Path, n_layer: int = 2) -> Path:
    path = tmp_path / f"base{n_layer}.pth"
    torch.save(tiny_base(0, torch.float32, n_layer), path)
    return path


def saved_adapter(tmp_path: Path, cfg: AdapterConfig, random_seed: int = 7) -> tuple[Path, RWKV6]:
    model = adapted_model(cfg, random_seed=random_seed)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, cfg, path)
    return path, model


CONFIGS = ALL_METHOD_CONFIGS + [AdapterConfig(method="bone", b=32, targets=("att.key", "ffn"),
                                              train_parts=("ln", "time"))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: config_id(c) + ("+parts" if c.train_parts else ""))
def test_round_trip_through_from_checkpoint(tmp_path: Path, cfg: AdapterConfig) -> None:
    path, model = saved_adapter(tmp_path, cfg)
    tensors, loaded_cfg, meta = load_adapter_file(path)
    assert loaded_cfg == cfg
    assert meta["n_layer"] == "2" and meta["n_embd"] == "128" and meta["format_version"] == "1"
    expected = adapter_state_dict(model, cfg)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert tensors

    restored = RWKV6.from_checkpoint(base_file(tmp_path), adapter=path, wkv_backend="torch").eval()
    with torch.no_grad():
        assert rel_err(restored(IDX), model(IDX)) < 1e-6
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == {k for k in tensors if "pissa" not in k}


def test_wrong_base_is_refused_with_both_sizes(tmp_path: Path) -> None:
    path, _ = saved_adapter(tmp_path, AdapterConfig(b=32))
    other = tiny_model(n_layer=3)
    with pytest.raises(AdapterError) as e:
        load_adapter_into(other, path)
    assert "n_layer=2" in str(e.value) and "n_layer=3" in str(e.value) and "different base" in str(e.value)
    assert not any(k.endswith(".bone") for k in other.state_dict())  # untouched


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, **meta_changes: str) -> None:
    """Re-save an adapter file with other tensors and/or changed metadata (simulating a bad file)."""
    with safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), **meta_changes}
        old_tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(old_tensors if tensors is None else tensors, str(path), metadata=meta)


def test_wrong_b_is_refused(tmp_path: Path) -> None:
    path, _ = saved_adapter(tmp_path, AdapterConfig(b=32))
    rewrite(path, b="64")
    with pytest.raises(AdapterError) as e:
        load_adapter_into(tiny_model(), path)
    msg = str(e.value)
    assert "b=64" in msg and "wrong shape" in msg and "got (4, 32, 32), expected (2, 64, 64)" in msg


def test_b_that_does_not_divide_the_base_is_refused(tmp_path: Path) -> None:
    path, _ = saved_adapter(tmp_path, AdapterConfig(b=32))
    rewrite(path, b="128")
    with pytest.raises(AdapterError, match="b=128 does not divide"):
        load_adapter_into(tiny_model(), path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path) -> None:
    path, _ = saved_adapter(tmp_path, AdapterConfig(b=32))
    tensors = load_file(str(path))
    del tensors["blocks.1.ffn.value.bone"]
    tensors["blocks.1.ffn.value.lora_A"] = torch.zeros(2, 2)
    rewrite(path, tensors)
    with pytest.raises(AdapterError) as e:
        load_adapter_into(tiny_model(), path)
    assert "missing (1): blocks.1.ffn.value.bone" in str(e.value)
    assert "unexpected (1): blocks.1.ffn.value.lora_A" in str(e.value)


def test_corrupt_non_adapter_and_wrong_format_files(tmp_path: Path) -> None:
    path, _ = saved_adapter(tmp_path, AdapterConfig(b=32))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter_into(tiny_model(), truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter_file(garbage)
    model_file = tmp_path / "model.safetensors"
    save_tensors(model_file, tiny_base(0, torch.float32, 2))
    with pytest.raises(AdapterError, match="not an adapter file"):
        load_adapter_file(model_file)
    with pytest.raises(AdapterError, match="are .safetensors"):
        load_adapter_file(base_file(tmp_path))
    with pytest.raises(AdapterError, match="no such adapter file"):
        load_adapter_file(tmp_path / "missing.safetensors")
    rewrite(path, grouping="diagonal")
    with pytest.raises(AdapterError, match="corrupt adapter metadata"):
        load_adapter_file(path)
    rewrite(path, grouping="row", format_version="2")
    with pytest.raises(AdapterError, match="newer"):
        load_adapter_file(path)


def test_save_checks_tensors_against_the_base(tmp_path: Path) -> None:
    cfg = AdapterConfig(b=32)
    model = adapted_model(cfg)
    tensors = adapter_state_dict(model, cfg)
    shapes = {k: tuple(v.shape) for k, v in base_state_dict(model).items()}
    with pytest.raises(AdapterError, match="needs base_shapes"):
        save_adapter(tensors, cfg, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="missing"):
        save_adapter({f"model.{k}": v for k, v in tensors.items()}, cfg, tmp_path / "a.safetensors", base_shapes=shapes)
    with pytest.raises(AdapterError, match="are .safetensors"):
        save_adapter(model, cfg, tmp_path / "a.pth")
    with pytest.raises(AdapterError, match="nothing to save"):
        save_adapter(tiny_model(), AdapterConfig(method="none", targets=()), tmp_path / "a.safetensors")
    save_adapter(tensors, cfg, tmp_path / "a.safetensors", base_shapes=shapes)
    assert load_adapter_file(tmp_path / "a.safetensors")[0].keys() == tensors.keys()
    assert not list(tmp_path.glob(".*.tmp"))
