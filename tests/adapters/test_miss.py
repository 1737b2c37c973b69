"""MiSS (peft's default mode, --peft miss): the layer against autograd on the naive formula in float64, merged ==
unmerged logits with a random adapter, unmerge, the adapter file and the flag, and LoRA's cost."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from src.adapters.config import AdapterConfig
from src.adapters.inject import adapter_state_dict, load_adapter_into, save_adapter
from src.adapters.merge import merge_state_dict, unmerge_state_dict
from src.adapters.miss import MiSSLinear
from src.config import TrainConfig
from src.errors import AdapterError, ConfigError
from src.model import RWKV6
from tests.adapters.reference import adapted_model, rel_err, tiny_base, tiny_model

IDX = torch.tensor([[5, 17, 200, 3, 99, 42, 0, 7, 130, 255, 1, 64]])


def naive_miss_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W'[o, i] = W[o, i] + D[i mod r, o], element by element."""
    out_f, in_f = weight.shape
    r = block.shape[0]
    delta = torch.stack([torch.stack([block[i % r, o] for i in range(in_f)]) for o in range(out_f)])
    return weight + delta


@pytest.mark.parametrize("out_f, in_f, r", [(48, 64, 16), (40, 96, 40), (24, 30, 7)])
def test_miss_matches_naive_formula_and_its_gradients_float64(out_f: int, in_f: int, r: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64), requires_grad=False)
    layer = MiSSLinear(weight, AdapterConfig(method="miss", miss_r=r))
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn(r, out_f, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 5, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, out_f, generator=gen, dtype=torch.float64)
    (layer(x) * dy).sum().backward()

    block = layer.miss_block.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ naive_miss_weight(weight.detach(), block).t()
    (y_ref * dy).sum().backward()
    assert rel_err(layer(x).detach(), y_ref.detach()) < 1e-12
    assert rel_err(x.grad, x_ref.grad) < 1e-12
    assert rel_err(layer.miss_block.grad, block.grad) < 1e-12
    # the merge builds the same W'; unmerge gives W back
    merged = MiSSLinear.merge(weight.detach(), {"miss_block": block.detach()}, layer.cfg)
    assert rel_err(merged, naive_miss_weight(weight.detach(), block.detach())) < 1e-12
    back = MiSSLinear.unmerge(merged, {"miss_block": block.detach()}, layer.cfg)
    assert rel_err(back, weight.detach()) < 1e-12


def test_merged_logits_equal_unmerged_and_unmerge_restores_the_base() -> None:
    cfg = AdapterConfig(method="miss", miss_r=32)
    adapted = adapted_model(cfg, random_seed=21)
    tensors = adapter_state_dict(adapted, cfg)
    assert tensors["blocks.0.att.key.miss_block"].shape == (32, 128)
    base = dict(tiny_base(0, torch.float32, 2))
    merged_sd = merge_state_dict(base, tensors, cfg)
    merged = tiny_model()
    merged.load_base_state_dict(merged_sd)
    with torch.no_grad():
        unmerged_logits, merged_logits, base_logits = adapted(IDX), merged(IDX), tiny_model()(IDX)
    assert rel_err(merged_logits, unmerged_logits) < 1e-5
    assert rel_err(merged_logits, base_logits) > 1e-3  # the adapter does change the model
    back = unmerge_state_dict(merged_sd, tensors, cfg)
    assert max(rel_err(back[k], base[k]) for k in base) < 1e-5


def test_zero_init_and_adapter_file_round_trip(tmp_path: Path) -> None:
    cfg = AdapterConfig(method="miss", miss_r=16, targets=("att",))
    fresh = adapted_model(cfg)
    with torch.no_grad():
        assert torch.equal(fresh(IDX), tiny_model()(IDX))  # D = 0: starts equal to the base
    adapted = adapted_model(cfg, random_seed=3)
    save_adapter(adapted, cfg, tmp_path / "miss.safetensors")
    loaded = tiny_model()
    load_adapter_into(loaded, tmp_path / "miss.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(IDX), adapted(IDX))
    assert AdapterConfig.from_metadata(cfg.to_metadata()) == cfg
    old = {k: v for k, v in AdapterConfig(b=32).to_metadata().items() if k != "miss_r"}
    assert AdapterConfig.from_metadata(old) == AdapterConfig(b=32)  # files from before MiSS still load


def test_flags_and_bad_ranks() -> None:
    cfg = TrainConfig(peft="miss", miss_r=16, dry_run=True).adapter
    assert (cfg.method, cfg.miss_r) == ("miss", 16)
    with pytest.raises(ConfigError, match="--miss_r"):
        AdapterConfig(method="miss", miss_r=0)
    with pytest.raises(AdapterError, match="exceeds the input size"):
        adapted_model(AdapterConfig(method="miss", miss_r=512))


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in (x.data_ptr(), layer.weight.data_ptr()):  # x and W are saved by any linear
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return total


def test_training_costs_what_lora_costs_at_rank_r() -> None:
    """Besides x and W (which the plain linear saves too), MiSS saves (tokens, r) plus D: no more than LoRA."""
    weight = nn.Parameter(torch.randn(512, 512), requires_grad=False)
    x = torch.randn(4, 256, 512, requires_grad=True)
    miss = _saved_bytes(MiSSLinear(weight, AdapterConfig(method="miss", miss_r=32)), x)
    from src.adapters.lora import LoRALinear

    lora = _saved_bytes(LoRALinear(weight, AdapterConfig(method="lora", lora_r=32)), x)
    assert miss <= lora and miss <= 4 * 256 * 32 * 4 + 32 * 512 * 4


def test_miss_loads_through_from_checkpoint(tmp_path: Path) -> None:
    cfg = AdapterConfig(method="miss", miss_r=32)
    adapted = adapted_model(cfg, random_seed=5)
    save_adapter(adapted, cfg, tmp_path / "a.safetensors")
    torch.save(dict(tiny_base(0, torch.float32, 2)), tmp_path / "base.pth")
    model = RWKV6.from_checkpoint(tmp_path / "base.pth", adapter=tmp_path / "a.safetensors", wkv_backend="torch")
    with torch.no_grad():
        assert rel_err(model.eval()(IDX), adapted(IDX)) < 1e-6
