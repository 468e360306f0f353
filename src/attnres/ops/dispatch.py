"""Which depth-read implementation runs: the one place that decides.

Implementations:

* ``reference``: :mod:`attnres.ops.reference`, the oracle (stacks the sources at every read).
* ``fused``: :func:`attnres.ops.fused.fused_depth_read` per read, with each source's statistics
  computed once per forward.
* ``two_phase``: phase 1 per group of ``S`` reads plus a phase-2 merge per read
  (:mod:`attnres.ops.two_phase`; without gradients, :mod:`attnres.ops.stacked`, which keeps the
  completed blocks in one preallocated stack and is what decoding and prefill use).
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

    ``auto`` picks by whether gradients are on, on every device and dtype:

    * training (grad enabled): ``fused``. On the project's quiet 2-core CPU, at the reference size
      (d=512, 16 sublayers, seq 512, batch 4, fp32), a train step measured Block 1.10x prenorm
      fused vs 1.18x two-phase, Full 1.19x vs 1.22x (``benchmarks/results/train_reference_quiet.md``):
      in PyTorch ops, two-phase's extra merge passes cost more than the shared pass over completed
      blocks saves.
    * inference (grad disabled): ``two_phase``, which then runs on a stack of the completed blocks
      (:mod:`attnres.ops.stacked`). One-thread prefill of 512 / 2048 tokens at d=512 measured
      Block 1.03x / 1.01x prenorm against fused 1.07x / 1.01x and reference 1.27x / 1.54x; Full
      1.06x / 1.09x against 1.13x / 1.10x and 1.54x / 2.11x (``benchmarks/results/infer_cpu.md``).
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
        return "fused" if torch.is_grad_enabled() else "two_phase"
    return impl
