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

Kernels, orthogonal to the implementation: ``fused`` and ``two_phase`` run their depth attend (and
``two_phase`` its merge) as PyTorch ops (``torch``), as the Triton kernels of
:mod:`attnres.ops.triton` (``triton``), or as the native C++ kernels of :mod:`attnres.ops.native`
(``native``, CPU: with gradients the depth attend, its merge stays PyTorch ops; without gradients
every step of the stacked reads of :mod:`attnres.ops.stacked`). ``auto`` (default) picks Triton for
CUDA tensors when Triton is installed, the native kernels for CPU tensors when they build, and PyTorch
otherwise
(:func:`kernels_for`; the same under ``torch.compile``). Force one with :func:`use_kernels` or, for a
whole process, the environment variable ``ATTNRES_KERNELS`` (``torch`` compares against the
PyTorch ops; ``triton`` on CPU runs Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before the kernels are first used).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from attnres.ops import triton as triton_ops
from attnres.ops.native import cpu_kernels

IMPLS = ("auto", "reference", "fused", "two_phase")
KERNELS = ("auto", "torch", "triton", "native")

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

    ``auto`` picks by whether gradients are on, on every device and dtype:

    * training (grad enabled): ``fused``. On the project's quiet 2-core CPU at the reference size
      (d=512, 16 sublayers, seq 512, batch 4, fp32; ``benchmarks/results/train_reference.md``), a
      train step measured Block 1.030x prenorm fused vs 1.034x two-phase, Full 1.090x vs 1.063x:
      equal within noise, and the fused read has no group state to carry.
    * inference (grad disabled): ``two_phase``, which then runs on a stack of the completed blocks
      (:mod:`attnres.ops.stacked`). Prefill throughput at T=512 / 2048 measured Block 1.10x /
      0.85x prenorm against 0.81x / 0.59x for the reference read, and one-token decoding about the
      same as the reference read (``benchmarks/results/infer_cpu.md``).

    On CUDA the same choice holds; the ops then run on the Triton kernels (:func:`kernels_for`),
    which have not been timed yet (no GPU so far).
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


def check_kernels(kernels: str) -> str:
    """Return ``kernels`` if it names a kernel backend, else raise an error listing the valid ones."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown depth-read kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    return kernels


def _kernels_from_env() -> str:
    """``ATTNRES_KERNELS`` (default ``auto``), checked when this module is imported."""
    try:
        return check_kernels(os.environ.get("ATTNRES_KERNELS", "auto"))
    except ValueError as e:
        raise ValueError(f"environment variable ATTNRES_KERNELS: {e} (or unset it)") from None


_env_kernels = _kernels_from_env()


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
    """Force the kernels (``auto``, ``torch``, ``triton``, ``native``) of every fast depth read in the block.

    Overrides ``ATTNRES_KERNELS``. The choice is made at each op call of the forward; a
    backward runs on the kernels its forward used, wherever it runs.
    """
    global _forced_kernels
    previous, _forced_kernels = _forced_kernels, check_kernels(kernels)
    try:
        yield
    finally:
        _forced_kernels = previous


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    """:func:`attnres.ops.triton.available`, a constant to ``torch.compile`` (it never traces into it)."""
    return triton_ops.available()


@torch.compiler.assume_constant_result
def _native_built() -> bool:
    """Whether the native kernels are built (building them now if not yet tried); a constant to compile."""
    return cpu_kernels() is not None


def kernels_for(x: Tensor) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: which kernels run a fast depth-read op on ``x``.

    The same answer eager and under ``torch.compile``: both kernels are custom ops
    (``attnres::native_attend``, ``attnres::triton_*``) that a compiled graph keeps as nodes
    (``fullgraph=True`` holds; ``tests/model/test_compile.py``). A graph is specialised on the
    choice: changing it (:func:`use_kernels`) recompiles.
    """
    kernels = _forced_kernels if _forced_kernels is not None else _env_kernels
    if kernels == "auto":
        if x.is_cuda and _triton_installed():
            return "triton"
        return "native" if x.device.type == "cpu" and _native_built() else "torch"
    if kernels == "triton":
        if not _triton_installed():
            raise ImportError("depth-read kernels 'triton' need Triton: pip install 'attnres[gpu]'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"depth-read kernels 'triton' got a {x.device.type} tensor: they need CUDA tensors, "
                "or TRITON_INTERPRET=1 (set before Triton is imported) to run on CPU"
            )
    if kernels == "native":
        if x.device.type != "cpu":
            raise ValueError(f"depth-read kernels 'native' are CPU kernels; got a {x.device.type} tensor")
        if not _native_built():
            raise RuntimeError("depth-read kernels 'native' could not be built; see the warning above")
    return kernels
