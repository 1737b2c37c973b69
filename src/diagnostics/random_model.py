"""Random RWKV6 x060 models and checkpoints under the official key names, at any size and without a download:
the one builder behind the tests' tiny checkpoints, the method comparison's --micro base, the GPU check's
checkpoints (tiny in --dry-run, RWKV6-1.6B shapes on a GPU) and the training-step measurements.

Two kinds of values:
  `noisy_init`    the project's from-scratch init (official x060, `RWKV6.init_weights`) plus noise on every
                  tensor, so that no tensor is zero or constant (zero output projections would hide bugs and make
                  PiSSA's SVD degenerate). Deterministic on the CPU; init_weights orthogonalises every matrix on
                  the CPU, which takes minutes at 1.6B: for small models.
  `fast_random`   random values of sane magnitudes generated directly on the model's device (GPU: seconds at
                  1.6B): projections ~ N(0, 1/in), output projections ten times smaller, decays spread over the
                  official range, mixes 0.5, norms 1.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from src.checkpoint import save_tensors
from src.model import RWKV6, RWKV6Config, base_state_dict

KINDS = ("noisy_init", "fast_random")


@torch.no_grad()
def fast_random_init(model: RWKV6, seed: int) -> None:
    """Overwrite every parameter of `model` in place with `fast_random` values, generated on its device."""
    gen = torch.Generator(device=model.emb.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and p.ndim == 1:  # LayerNorm, GroupNorm
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        elif leaf == "time_decay":
            p.copy_(torch.linspace(-6.0, -1.0, p.numel(), device=p.device).view_as(p))
        elif leaf.startswith("time_maa") and p.ndim == 3 and p.shape[0] == 1:
            p.fill_(0.5)
        elif p.ndim == 2 and leaf == "weight":
            std = 1e-2 if name == "emb.weight" else p.shape[1] ** -0.5
            if name.endswith(("att.output.weight", "ffn.value.weight")):
                std *= 0.1
            p.normal_(0.0, std, generator=gen)
        else:  # low-rank mixers, bonus
            p.normal_(0.0, 1e-2, generator=gen)


def random_model(cfg: RWKV6Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> RWKV6:
    """A `fast_random` RWKV6 of cfg's sizes in `dtype` on `device`, built without first materialising it on the
    CPU (meta device, then empty tensors on `device`)."""
    with torch.device("meta"):
        model = RWKV6(cfg)
    model = model.to_empty(device=device).to(dtype)
    fast_random_init(model, seed)
    return model


def random_state_dict(cfg: RWKV6Config, seed: int = 0, dtype: torch.dtype = torch.float32, kind: str = "noisy_init",
                      noise: float = 0.1, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """An official-key x060 state dict of random values (see the module docstring for `kind`), on the CPU.

    noisy_init: each tensor gets N(0, 1) noise times noise * its standard deviation (at least noise / 2, so
    zero and constant tensors get some too). fast_random: built in `dtype` on `device`, then copied to the CPU."""
    if kind == "fast_random":
        model = random_model(cfg, seed, dtype, device)
        return {k: v.detach().cpu() for k, v in base_state_dict(model).items()}
    if kind != "noisy_init":
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    model = RWKV6(cfg)
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in base_state_dict(model).items():
        v = v.detach().clone()
        scale = noise * (v.std().item() if v.numel() > 1 and v.std().item() > 0 else 1.0)
        v += torch.randn(v.shape, generator=gen) * max(scale, noise * 0.5)
        sd[k] = v.to(dtype)
    return sd


def save_random_checkpoint(path: str | Path, cfg: RWKV6Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                           kind: str = "noisy_init", device: str | torch.device = "cpu") -> Path:
    """Write `random_state_dict(...)` as a checkpoint file (.pth like the official ones, or .safetensors)."""
    save_tensors(path, random_state_dict(cfg, seed, dtype, kind, device=device))
    return Path(path)
