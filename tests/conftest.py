"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

# Tests run on 2 cores next to other jobs; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))

# Without CUDA, tests/ops/test_triton.py runs the Triton kernels under Triton's interpreter. Triton
# reads this switch when it is first imported (its language functions are decorated then), and
# torch.compile imports it, so it has to be set before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tokenizer/token cache for the whole session (BPE training and encoding take seconds)."""
    path = os.environ.get("ATTNRES_TEST_CACHE") or str(tmp_path_factory.mktemp("attnres-cache"))
    return path
