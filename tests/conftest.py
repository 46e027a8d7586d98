"""Shared fixtures: the tiny backend (built once per session) and self-made images."""

from __future__ import annotations

import pytest
import torch

from hifi.registry import load_backend


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tiny model's ops are so small that extra threads only add overhead (a lot on a busy
    machine); tests of the full-size architectures raise it for themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` backend with seed 0 (random weights, CPU)."""
    return load_backend("tiny", seed=0)

