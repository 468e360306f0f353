"""Which depth-read implementation runs: the one place that decides.

Implementations:

* ``reference``: :mod:`attnres.ops.reference`, the oracle (stacks the sources at every read).
* ``fused``: :func:`attnres.ops.fused.fused_depth_read` per read, with each source's statistics
  computed once per forward.
* ``two_phase``: phase 1 per group of ``S`` reads plus a phase-2 merge per read
  (:mod:`attnres.ops.two_phase`).
* ``auto`` (default): the fastest correct one for the device and dtype (:func:`select_impl`).

A config field (``ResidualConfig.impl``) picks one per model; :func:`use_impl` forces one for a
block of code (tests and benchmarks), overriding the config.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

IMPLS = ("auto", "reference", "fused", "two_phase")

_forced: str | None = None


def check_impl(impl: str) -> str:
    """Return ``impl`` if it names an implementation, else raise an error listing the valid ones."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depth-read implementation {impl!r}; valid: {', '.join(IMPLS)}")
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Force the depth-read implementation of every AttnRes forward started inside the block.

    Overrides ``ResidualConfig.impl``. Forward passes started outside the block keep their choice
    (it is made once per forward, in ``init_state``).
    """
    global _forced
    previous, _forced = _forced, check_impl(impl)
    try:
        yield
    finally:
        _forced = previous


def select_impl(configured: str, supported: bool = True) -> str:
    """The implementation one forward pass uses.

    Args:
        configured: ``ResidualConfig.impl``; a :func:`use_impl` block overrides it.
        supported: whether the scheme's configuration is one the fast paths implement. When it is
            not, the answer is ``reference`` (with a warning if a fast path was asked for by name).

    ``auto`` picks ``fused`` on every device and dtype. On the project's quiet 2-core CPU, at the
    reference size (d=512, 16 sublayers, seq 512, batch 4, fp32), a train step measured
    Block 1.10x prenorm fused vs 1.18x two-phase, Full 1.19x vs 1.22x
    (``benchmarks/results/train_reference_quiet.md``): in PyTorch ops, two-phase's extra merge
    passes cost more than the shared pass over completed blocks saves. No GPU kernel exists yet
    to prefer on CUDA.
    """
    impl = check_impl(_forced if _forced is not None else configured)
    if impl == "reference":
        return impl
    if not supported:
        if impl != "auto" and not torch.compiler.is_compiling():
            warnings.warn(
                f"depth-read implementation {impl!r} does not support this residual configuration; "
                "using 'reference'",
                stacklevel=3,
            )
        return "reference"
    if impl == "auto":
        return "fused"
    return impl
