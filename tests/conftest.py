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


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, restored after it: tiny models run faster so,
    and on a busy machine much faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
