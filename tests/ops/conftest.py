"""Fixtures for the depth-read tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from attnres.ops.dispatch import use_kernels
from attnres.ops.native import cpu_kernels


@pytest.fixture(params=["native", "torch"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the native CPU kernels (outputs NaN-poisoned) and on the PyTorch-ops path."""
    if request.param == "torch":
        with use_kernels("torch"):
            yield "torch"
        return
    if os.environ.get("ATTNRES_KERNELS") == "torch":
        pytest.skip("native kernels turned off by ATTNRES_KERNELS=torch")
    kernels = cpu_kernels()
    assert kernels is not None, "the native CPU kernel did not build (see the warning above)"
    kernels.set_poison_outputs(True)
    try:
        with use_kernels("native"):
            yield "native"
    finally:
        kernels.set_poison_outputs(False)
