"""The relative error every numerical test compares with, in one place.

``tests/`` is on ``sys.path`` under pytest (``tests/conftest.py`` lives there), so any test file
imports it as ``from numerics import rel_err``.
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` in fp64: ``‖a − b‖ / ‖b‖``.

    For tensors of one shape this is also the ratio of the RMS values (the relative RMS error).
    """
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
