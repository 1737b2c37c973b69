"""src/data/loader.py: the loss-token count of a step window is an integer that survives every precision plugin."""
from __future__ import annotations

import pytest
import torch
from pytorch_lightning.plugins.precision import DeepSpeedPrecision

from src.data.dataset import KeyedDataset, SampleKey
from src.data.loader import StepWindowDataset


class _Docs(KeyedDataset):
    """n samples of length T whose masks hold `tokens` ones each."""

    def __init__(self, n: int, T: int, tokens: int):
        super().__init__(T, n)
        self.tokens = tokens

    def _sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(self.ctx_len)
        mask[: self.tokens] = 1.0
        zeros = torch.zeros(self.ctx_len, dtype=torch.long)
        return {"input": zeros, "target": zeros, "mask": mask}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_window_token_count_survives_precision_casts(precision: str) -> None:
    """DeepSpeedPrecision casts every floating tensor of a batch: a float count of 65,600 tokens becomes inf in
    fp16 (the loss then trains nothing) and 65,536 in bf16. The count is an integer and stays exact."""
    data = StepWindowDataset(_Docs(n=4, T=16_400, tokens=16_400), window=4)
    sample = data[SampleKey(0, 1)]
    assert sample["window_tokens"].dtype == torch.int64 and int(sample["window_tokens"]) == 65_600
    cast = DeepSpeedPrecision(precision).convert_input({k: v[None] for k, v in sample.items()})  # type: ignore[arg-type]
    assert cast["window_tokens"].dtype == torch.int64 and int(cast["window_tokens"][0]) == 65_600
    assert float(torch.tensor(65_600.0).to(DeepSpeedPrecision(precision)._desired_dtype)) != 65_600  # the bug it avoids
