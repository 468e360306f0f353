"""The GPU path: Triton kernels for the depth reads, training (forward and backward) and no-grad.

Optional: this package imports Triton only when a kernel is called, so ``import attnres`` and
every CPU path work without it (install it with ``pip install 'attnres[gpu]'``).
:mod:`attnres.ops.dispatch` decides when these kernels run (CUDA tensors, Triton installed, by
default). The kernels (:mod:`.kernels`) and their custom ops:

* training, :mod:`.autograd` (``attnres::triton_attend``, ``attnres::triton_merge`` and their
  backwards): the bodies of :func:`attnres.ops.fused.depth_attend` and of the merge in
  :func:`attnres.ops.two_phase.phase2_merge` (``attend_logits_kernel``, ``attend_output_kernel``,
  ``attend_grad_stats_kernel``, ``attend_grad_kernel``, ``merge_kernel``, ``merge_grad_kernel``);
* inference without gradients, :mod:`.stacked` (``attnres::triton_stack_phase1``,
  ``attnres::triton_stack_merge``, the twins of the native stack ops): phase 1 of
  :func:`attnres.ops.stacked.stacked_phase1` over the stack of completed blocks
  (``stack_logits_kernel``, ``stack_output_kernel``, one launch each for any number of blocks) and
  the merge of :func:`attnres.ops.stacked.stacked_merge`, optionally fused with the RMSNorm that
  consumes the read (``stack_merge_kernel``). Their design is in :mod:`.stacked`; what follows
  describes the training kernels, whose contracts and math they share where they overlap:

* statistics in fp32 (fp64 for fp64 sources) whatever the stream dtype; outputs cast as the
  PyTorch path casts them (attend outputs and ``lse`` in the statistics dtype, the merge output
  and every source gradient in the stream dtype);
* the key gain folded into the query by the caller (:func:`attnres.ops.fused.fold_query`);
* the backward saves per-token statistics only (``v · q`` and ``lse`` for the attend, ``σ`` and
  ``p · q`` for the merge) plus references to tensors the model keeps anyway, and recomputes
  the softmax weights;
* any ``d``: the channel dimension is tiled and masked, never assumed a power of two.

**How the sources are passed.** A read takes its sources as a Python list and must not
``torch.stack`` them (that copies every source at every read). Each kernel has eight source
pointer arguments and a compile-time count of those in use; a read over more sources runs one
launch per chunk of eight. The forward runs two passes, each over all chunks: the first computes
``v_j · q_s`` and folds each chunk's logits into a running log-sum-exp (the online-softmax merge,
so the chunks combine exactly); the second, with the final ``lse``, adds each chunk's
``Σ_j α_sj v_j`` to the outputs. The backward mirrors it (``g_s · v_j`` and ``g_s · o_s``, then
the gradients). Why this and not the alternatives:

* a device array of pointers (one launch for any ``N``) needs ``data_ptr()`` of every source
  and a host-to-device copy per read, which ``torch.compile`` cannot trace;
* one kernel specialised per source count recompiles for every ``N`` a model reads (up to
  ``L + 1`` for Full AttnRes);
* fixed slots compile at most eight source-count variants of a kernel (per query count and
  dtype), keep the sources as ordinary tensor arguments, and cost nothing extra up to eight
  sources; past eight, each further chunk adds a read-modify-write of the ``[S, M, d]``
  outputs (Block AttnRes at the paper's ~8 blocks needs it only for its last reads; Full
  AttnRes pays it on every read past the eighth sublayer).

The ``S`` gradients of the backward are pointer slots too, so one autograd call takes at most
eight queries; phase 1 of a larger group runs as several calls (each reads the sources once).

**Testing.** ``tests/ops/test_triton.py`` (training) and ``tests/ops/test_triton_stacked.py``
(no-grad) run every kernel on CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against
:mod:`attnres.ops.reference` and the PyTorch fast path, with NaN-filled buffers, and compile each
kernel for sm_90 without a GPU. The interpreter
rounds fp32 → bf16 stores toward zero, the GPU to nearest; bf16 tolerances cover both. Block
sizes are fixed heuristics, not tuned, and the kernels have not yet been timed on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

from torch import Tensor


@functools.cache
def available() -> bool:
    """Whether Triton is installed (the kernels are not imported by this check)."""
    return importlib.util.find_spec("triton") is not None


def depth_attend(
    sources: Sequence[Tensor], rstd: Sequence[Tensor], queries: Tensor
) -> tuple[tuple[Tensor, ...], Tensor]:
    """:func:`attnres.ops.fused.depth_attend` on the Triton kernels (arguments validated there)."""
    from attnres.ops.triton.autograd import depth_attend as attend

    return attend(sources, rstd, queries)


def merge(o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> Tensor:
    """The merge of :func:`attnres.ops.two_phase.phase2_merge` on the Triton kernels."""
    from attnres.ops.triton.autograd import merge as merge_

    return merge_(o, lse, p, r_p, q)


def stack_phase1(
    values: Tensor, rstd: Tensor, n: int, queries: Tensor, need_lse: bool
) -> tuple[Tensor, Tensor]:
    """Phase 1 of :func:`attnres.ops.stacked.stacked_phase1` over the stack, on the Triton kernels."""
    from attnres.ops.triton.stacked import stack_phase1 as phase1

    return phase1(values, rstd, n, queries, need_lse)


def stack_merge(
    o: Tensor, lse: Tensor, p: Tensor, p_rstd: Tensor, q: Tensor, weight: Tensor | None, eps: float
) -> Tensor:
    """The merge (+ norm) of :func:`attnres.ops.stacked.stacked_merge`, on the Triton kernels."""
    from attnres.ops.triton.stacked import stack_merge as merge_

    return merge_(o, lse, p, p_rstd, q, weight, eps)
