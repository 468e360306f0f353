"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

# Tests run on 2 cores next to other jobs; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tokenizer/token cache for the whole session (BPE training and encoding take seconds)."""
    path = os.environ.get("ATTNRES_TEST_CACHE") or str(tmp_path_factory.mktemp("attnres-cache"))
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of ``a`` against ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()
