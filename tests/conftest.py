"""Shared fixtures: a tiny synthetic config and the location of ../shared/data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "task": {"name": "synthetic"},
    "train": {"epochs": 3, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "none"},
}


@pytest.fixture
def tiny() -> dict[str, Any]:
    """A fresh copy of a config that trains on the synthetic task in about a second."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """One intra-op thread for the requesting module: the models there are tiny, so one
    thread is as fast, two processes' threads do not fight over a busy machine's cores
    (several times slower), and figures no longer depend on the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
