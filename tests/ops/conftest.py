"""Fixtures for the depth-read tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from attnres.ops.native import cpu_kernels, native_kernels


@pytest.fixture(params=["native", "torch"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the native CPU kernels (outputs NaN-poisoned) and on the PyTorch-ops path."""
    if request.param == "torch":
        with native_kernels(False):
            yield "torch"
        return
    if os.environ.get("ATTNRES_NATIVE") == "0":
        pytest.skip("native kernels turned off by ATTNRES_NATIVE=0")
    kernels = cpu_kernels()
    assert kernels is not None, "the native CPU kernel did not build (see the warning above)"
    kernels.set_poison_outputs(True)
    try:
        yield "native"
    finally:
        kernels.set_poison_outputs(False)
