"""Test helpers: the naive per-block Bone formula (an independent reference), random adapters, tiny models."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from src.adapters.config import AdapterConfig
from src.adapters.inject import adapter_state_dict, inject_adapters
from src.model import RWKV6
from tests.tiny import tiny_config, tiny_state_dict


def naive_block_affine(weight: Tensor, tensors: dict[str, Tensor], method: str, grouping: str) -> Tensor:
    """W' built block by block from the paper's formula, with plain slicing and Python loops."""
    mult = tensors["bone_A"] if method == "bone_unconstrained" else tensors["bone"]
    add = tensors["bone_B"] if method == "bone_unconstrained" else tensors["bone"]
    b = mult.shape[-1]
    out_f, in_f = weight.shape
    rows = []
    for a in range(out_f // b):
        row = []
        for c in range(in_f // b):
            g = c if grouping == "row" else a
            block = weight[a * b:(a + 1) * b, c * b:(c + 1) * b]
            times = block * mult[g] if method == "bone_hadamard" else block @ mult[g]
            row.append(block + times + add[g])
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def naive_lora(weight: Tensor, tensors: dict[str, Tensor], scaling: float, pissa: bool) -> Tensor:
    out = weight + scaling * tensors["lora_B"] @ tensors["lora_A"]
    if pissa:
        out = out - scaling * tensors["pissa_B0"] @ tensors["pissa_A0"]
    return out


@torch.no_grad()
def randomize_adapter(model: torch.nn.Module, cfg: AdapterConfig, seed: int, scale: float = 0.05) -> None:
    """Fill every adapter tensor (and trained extra part) with random values, so merges are not no-ops."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in adapter_state_dict(model, cfg).items():
        if name.endswith((".pissa_A0", ".pissa_B0")):
            continue
        t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * scale)


@functools.lru_cache(maxsize=8)
def tiny_base(seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2) -> dict[str, Tensor]:
    """A tiny random official-key state dict (2 layers, C=128, F=448, V=256); cached: do not modify it."""
    return tiny_state_dict(tiny_config(n_layer=n_layer), seed=seed, dtype=dtype)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2) -> RWKV6:
    """An RWKV6 holding tiny_base(seed, dtype, n_layer), eval mode."""
    with torch.device("meta"):
        model = RWKV6(tiny_config(n_layer=n_layer))
    model = model.to_empty(device="cpu").to(dtype)
    model.load_base_state_dict(tiny_base(seed, dtype, n_layer))
    return model.eval()


def adapted_model(cfg: AdapterConfig, seed: int = 0, random_seed: int | None = None, **kw: object) -> RWKV6:
    """tiny_model + injected adapter, randomised when random_seed is given."""
    torch.manual_seed(seed)
    model = tiny_model(seed=seed, **kw)
    inject_adapters(model, cfg)
    if random_seed is not None:
        randomize_adapter(model, cfg, random_seed)
    return model


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


ALL_METHOD_CONFIGS = [
    AdapterConfig(method="bone", b=32, grouping="row"),
    AdapterConfig(method="bone", b=32, grouping="col"),
    AdapterConfig(method="bone_unconstrained", b=32, grouping="row"),
    AdapterConfig(method="bone_hadamard", b=32, grouping="row"),
    AdapterConfig(method="lora", lora_r=8, lora_alpha=16),
    AdapterConfig(method="pissa", lora_r=8, lora_alpha=16),
]


def config_id(cfg: AdapterConfig) -> str:
    return f"{cfg.method}-{cfg.grouping}" if cfg.method.startswith("bone") else cfg.method
