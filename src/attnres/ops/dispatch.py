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

Kernels, orthogonal to the implementation: ``fused`` and ``two_phase`` run their depth attend and
merge either as PyTorch ops (``torch``) or as the Triton kernels of :mod:`attnres.ops.triton`
(``triton``). ``auto`` (default) picks Triton for CUDA tensors when Triton is installed, outside
``torch.compile``, and PyTorch otherwise (:func:`kernels_for`). Force one with
:func:`use_kernels` or, for a whole process, the environment variable ``ATTNRES_KERNELS``
(``torch`` compares against the PyTorch ops on a GPU; ``triton`` on CPU runs Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` set before the kernels are first used).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from attnres.ops import triton as triton_ops

IMPLS = ("auto", "reference", "fused", "two_phase")
KERNELS = ("auto", "torch", "triton")

_forced: str | None = None
_forced_kernels: str | None = None


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
    passes cost more than the shared pass over completed blocks saves. On CUDA the ops run on
    the Triton kernels (:func:`kernels_for`), which have not been timed yet (no GPU so far), so
    ``auto`` stays ``fused`` there too.
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


def check_kernels(kernels: str) -> str:
    """Return ``kernels`` if it names a kernel backend, else raise an error listing the valid ones."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown depth-read kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    return kernels


_env_kernels = check_kernels(os.environ.get("ATTNRES_KERNELS", "auto"))


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
    """Force the kernels (``auto``, ``torch`` or ``triton``) of every fast depth read in the block.

    Overrides ``ATTNRES_KERNELS``. The choice is made at each op call of the forward; a
    backward runs on the kernels its forward used, wherever it runs.
    """
    global _forced_kernels
    previous, _forced_kernels = _forced_kernels, check_kernels(kernels)
    try:
        yield
    finally:
        _forced_kernels = previous


def kernels_for(x: Tensor) -> str:
    """``"triton"`` or ``"torch"``: which kernels run a fused or two-phase op on ``x``'s device.

    ``auto`` leaves the ops to PyTorch under ``torch.compile``, which traces and fuses them
    (``fullgraph=True`` is tested there); Triton kernels inside a compiled graph are untested.
    """
    kernels = _forced_kernels if _forced_kernels is not None else _env_kernels
    if kernels == "auto":
        use = x.is_cuda and triton_ops.available() and not torch.compiler.is_compiling()
        return "triton" if use else "torch"
    if kernels == "triton":
        if not triton_ops.available():
            raise ImportError("depth-read kernels 'triton' need Triton: pip install 'attnres[gpu]'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"depth-read kernels 'triton' got a {x.device.type} tensor: they need CUDA tensors, "
                "or TRITON_INTERPRET=1 (set before Triton is imported) to run on CPU"
            )
    return kernels
