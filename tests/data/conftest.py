"""Shared fixtures of the data pipeline tests."""
from __future__ import annotations

import pytest

from src.data.tokenizer import WorldTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> WorldTokenizer:
    return WorldTokenizer()
