"""Export tests: one thread, and one tiny World-vocabulary model (V = 65536, the World tokenizer's size; 2 layers,
C = 64) with a state-tuned Bone adapter, written once per session."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from src.adapters.config import AdapterConfig
from src.adapters.inject import adapter_state_dict, inject_adapters, save_adapter
from src.adapters.merge import merge_state_dict
from src.model import RWKV6, RWKV6Config
from tests.adapters.reference import randomize_adapter
from tests.tiny import tiny_config, tiny_state_dict

WORLD = 65536
TOKENS = [33, 1209, 24281, 11, 261, 4600, 65529, 0, 10, 50000, 3, 12345, 261, 7]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class World:
    base: Path  # .pth, fp32
    adapter: Path  # Bone-row b=32 + trained initial state
    merged: dict[str, torch.Tensor]  # what merging gives, in memory
    cfg: AdapterConfig


def model_from(sd: dict[str, torch.Tensor]) -> RWKV6:
    cfg = RWKV6Config.from_state_dict(sd, wkv_backend="torch")
    model = RWKV6(cfg)
    model.load_base_state_dict(sd)
    return model.eval()


def logits_of(sd: dict[str, torch.Tensor], tokens: list[int] = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model_from({k: v.float() for k, v in sd.items()})(torch.tensor([tokens]))[0]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("world")
    cfg = tiny_config(n_layer=2, n_embd=64, vocab_size=WORLD)
    sd = tiny_state_dict(cfg, seed=0)
    torch.save(sd, folder / "base.pth")
    acfg = AdapterConfig(method="bone", b=32, train_parts=("state",))
    model = RWKV6(cfg)
    model.load_base_state_dict(sd)
    inject_adapters(model, acfg)
    randomize_adapter(model, acfg, seed=4, scale=0.05)
    save_adapter(model, acfg, folder / "adapter.safetensors")
    merged = merge_state_dict(sd, {k: v.detach() for k, v in adapter_state_dict(model, acfg).items()}, acfg)
    return World(base=folder / "base.pth", adapter=folder / "adapter.safetensors", merged=merged, cfg=acfg)
