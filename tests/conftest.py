"""Shared test configuration: deterministic seeds and dtype control."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_default_dtype():
    """Every test starts from the same global RNG state and the float32 default dtype."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)
