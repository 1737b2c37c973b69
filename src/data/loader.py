"""DataLoaders for the trainer: optimizer-step windows over the deterministic sampler, with each sample
carrying the loss-token count of its whole step window so the loss is an exact token-weighted mean
across micro-batches, gradient accumulation and ranks.

Optimizer step s of an epoch consumes global samples [s*G, (s+1)*G), G = micro_bsz * accumulate * world_size:
``EpochSampler`` deals global index k*world + rank to each rank in turn, so every micro-batch lies inside
one window. Sample counts are padded up to a multiple of G with all-masked padding samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from src.data.dataset import PAD_INDEX, EpochSampler, KeyedDataset, Sample, SampleKey


class StepWindowDataset(Dataset):
    """Wraps a KeyedDataset: indices past its end become padding, and every sample gets
    ``window_tokens`` (int64, shape ()): the loss tokens of all G samples of its optimizer step. It is an integer
    on purpose: precision plugins cast every floating tensor of a batch (DeepSpeed's bf16/fp16 would round the
    count, and fp16 turns 65,520 or more into inf)."""

    def __init__(self, base: KeyedDataset, window: int):
        self.base = base
        self.window = window
        self.padded = math.ceil(base.num_samples / window) * window
        self._cache: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return self.padded

    def _real(self, epoch: int, index: int) -> SampleKey:
        return SampleKey(epoch, index if 0 <= index < self.base.num_samples else PAD_INDEX)

    def window_tokens(self, epoch: int, window_id: int) -> int:
        key = (epoch, window_id)
        if key not in self._cache:
            start = window_id * self.window
            self._cache = {key: int(sum(int(self.base[self._real(epoch, i)]["mask"].sum().item())
                                        for i in range(start, start + self.window)))}
        return self._cache[key]

    def __getitem__(self, key: SampleKey) -> Sample:
        epoch, index = int(key[0]), int(key[1])
        sample = dict(self.base[self._real(epoch, index)])
        sample["window_tokens"] = torch.tensor(self.window_tokens(epoch, index // self.window), dtype=torch.int64)
        return sample


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    steps_per_epoch: int  # optimizer steps


def make_loaders(train: KeyedDataset, val: KeyedDataset | None, micro_bsz: int, accumulate: int, rank: int,
                 world_size: int) -> Loaders:
    """Train loader (step windows, deterministic per epoch) and validation loader (every sample once)."""
    window = micro_bsz * accumulate * world_size
    wrapped = StepWindowDataset(train, window)
    train_loader = DataLoader(wrapped, batch_size=micro_bsz, sampler=EpochSampler(len(wrapped), rank, world_size),
                              num_workers=0, drop_last=False)
    val_loader = None
    if val is not None:
        val_loader = DataLoader(val, batch_size=micro_bsz, sampler=EpochSampler(val.num_samples, rank, world_size),
                                num_workers=0)
    return Loaders(train_loader, val_loader, len(wrapped) // window)
