"""Shared fixtures: the tiny backend (built once per session) and self-made images."""

from __future__ import annotations

import pytest
import torch

from hifi.registry import load_backend


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` backend with seed 0 (random weights, CPU)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_backend("tiny", seed=0)

