"""The no-grad stacked reads (:mod:`attnres.ops.stacked`) on Triton: twins of the native stack ops.

``attnres::triton_stack_phase1`` and ``attnres::triton_stack_merge`` have the contracts of
``attnres::native_stack_phase1`` and ``attnres::native_stack_merge`` (:mod:`attnres.ops.native`),
as ``torch.library.custom_op``\\ s with fake implementations, so ``torch.compile(fullgraph=True)``
keeps each as one node. They have no backward: :mod:`attnres.ops.stacked` calls them only with
gradients disabled, and they refuse inputs that require a gradient while grad mode is on (an op
without an autograd formula would otherwise fail only later, in the backward).
Importing this module imports Triton.

**Phase 1**, two launches for any number of blocks ``n`` (the stack is one tensor, so a block is an
offset and ``n`` a runtime value: no pointer slots, no recompile per ``n``, unlike the training
attend of :mod:`.autograd`, which takes a list of separate sources):

1. ``stack_logits_kernel``, grid token blocks × ``n`` × query blocks: ``z = r (v · q)`` into a
   scratch ``[n, M, S]``, every block's dots in parallel;
2. ``stack_output_kernel``, grid token blocks × channel blocks × query blocks: each program folds
   its tokens' ``n`` logits into ``lse`` and adds ``Σ_j α_j v_j`` over its channel block.

One launch would do (a program per token block computing the logits, then the outputs, over all of
``d``), but it reads each token's ``n · d`` stack entries in a single program: with decoding's few
tokens that is one or two programs on the whole GPU. Splitting the passes lets both spread over
the blocks and the channels, for the price of one more launch and an ``n · M · S`` scratch that is
``d / S`` times smaller than the stack.

**The merge** (+ norm), one launch, grid token blocks: up to ``d ≤`` :data:`ONE_TILE_MAX` a
program holds its tokens' whole rows in registers (one read of ``o``, ``p``, ``q``, ``w``); above,
it sweeps a row in tiles: ``p · q``, then ``Σ h²`` when normalising, then it recomputes ``h`` per
tile to store it. Either way ``h`` and the norm are computed in the statistics dtype and rounded
once, to the partial's dtype. The norm's ``eps`` is passed as a 32-bit float (Triton's type for a
Python float): for a float64 stream that rounds the epsilon itself, not the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from attnres.ops.triton import autograd, kernels

_TILE = 4096  # elements per register tile ([BLOCK_M, BLOCK_S, BLOCK_D] or [BLOCK_M, BLOCK_D])
MAX_BLOCK_S = 8  # queries per program; more run as further programs along the grid's last axis
ONE_TILE_MAX = 4096  # the merge keeps a whole row in registers up to this d


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A kernel buffer, from the allocator of the training ops (the one place tests poison with NaN)."""
    return autograd._empty(shape, dtype, device)


def _refuse_grad(op: str, *tensors: Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"attnres::{op} is a no-grad inference kernel (no backward): call it under torch.no_grad(), "
            "or use the training reads (attnres.ops.fused / two_phase)"
        )


def _phase1_meta(m: int, s: int, d: int) -> dict[str, int]:
    block_s = min(triton.next_power_of_2(s), MAX_BLOCK_S)
    block_d = min(triton.next_power_of_2(d), 128)
    block_m = max(1, min(64, triton.next_power_of_2(m), _TILE // (block_s * block_d)))
    return {"BLOCK_M": block_m, "BLOCK_S": block_s, "BLOCK_D": block_d}


@torch.library.custom_op("attnres::triton_stack_phase1", mutates_args=())
def triton_stack_phase1(
    values: Tensor, rstd: Tensor, n: int, queries: Tensor, need_lse: bool
) -> tuple[Tensor, Tensor]:
    """Phase 1 of ``S`` queries ``[S, d]`` against the first ``n`` blocks of a stack, in Triton.

    ``values [C, M, d]`` and ``rstd [C, M, 1]`` (the stack, contiguous) and ``queries`` in the
    statistics dtype. Returns ``outs [M, S, d]`` and ``lse [M, S]`` (an empty tensor unless
    ``need_lse``), in the statistics dtype.
    """
    c, m, d = values.shape
    if not 1 <= n <= c:
        raise ValueError(f"triton_stack_phase1: n must be in [1, {c}], got {n}")
    if not (values.is_contiguous() and rstd.is_contiguous() and rstd.numel() == c * m):
        raise ValueError("triton_stack_phase1: values [C, M, d] and rstd [C, M, 1] must be contiguous stacks")
    if queries.dim() != 2 or queries.shape[1] != d or not (values.dtype == rstd.dtype == queries.dtype):
        raise ValueError("triton_stack_phase1: queries must be [S, d] in the stack's dtype")
    queries = queries.contiguous()
    s, dev = queries.shape[0], values.device
    meta = _phase1_meta(m, s, d)
    grid_m, grid_s = triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(s, meta["BLOCK_S"])
    z = _empty((n, m, s), values.dtype, dev)
    outs = _empty((m, s, d), values.dtype, dev)
    lse = _empty((m, s) if need_lse else (0,), values.dtype, dev)
    kernels.stack_logits_kernel[(grid_m, n, grid_s)](values, rstd, queries, z, m, d, s, **meta)
    kernels.stack_output_kernel[(grid_m, triton.cdiv(d, meta["BLOCK_D"]), grid_s)](
        values, z, outs, lse, n, m, d, s, NEED_LSE=need_lse, **meta
    )
    return outs, lse


@triton_stack_phase1.register_fake
def _(values: Tensor, rstd: Tensor, n: int, queries: Tensor, need_lse: bool) -> tuple[Tensor, Tensor]:
    (_, m, d), s = values.shape, queries.shape[0]
    return values.new_empty((m, s, d)), values.new_empty((m, s) if need_lse else (0,))


def _merge_meta(m: int, d: int) -> dict[str, int]:
    one_tile = d <= ONE_TILE_MAX
    # past ONE_TILE_MAX, tiles of 1024 (or of ONE_TILE_MAX where a test lowers it to sweep small rows)
    block_d = triton.next_power_of_2(d) if one_tile else min(1024, triton.next_power_of_2(ONE_TILE_MAX))
    block_m = max(1, min(64, triton.next_power_of_2(m), _TILE // block_d))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "ONE_TILE": one_tile}


@torch.library.custom_op("attnres::triton_stack_merge", mutates_args=())
def triton_stack_merge(
    o: Tensor, lse: Tensor, p: Tensor, p_rstd: Tensor, q: Tensor, weight: Tensor | None, eps: float
) -> Tensor:
    """Phase 2, ``h = o + σ(r_p (p · q) − lse)(p − o)``, then ``rmsnorm(h) · weight`` if ``weight``.

    ``o [M, d]`` (statistics dtype) and ``p [M, d]`` may have any row stride (a unit stride along
    ``d`` is used as is, another is copied); ``lse`` and ``p_rstd`` are ``[M]`` in the statistics
    dtype, any stride; ``q [d]``; ``weight [d]`` in ``p``'s dtype and ``eps`` the norm's. Returns a
    contiguous ``[M, d]`` in ``p``'s dtype.
    """
    m, d = p.shape
    cd = o.dtype
    if o.shape != p.shape or lse.shape != (m,) or p_rstd.shape != (m,) or q.shape != (d,):
        raise ValueError("triton_stack_merge: o and p must be [M, d], lse and p_rstd [M], q [d]")
    if not (lse.dtype == p_rstd.dtype == q.dtype == cd):
        raise ValueError("triton_stack_merge: o, lse, p_rstd and q must share the statistics dtype")
    if weight is not None and (weight.shape != (d,) or weight.dtype != p.dtype):
        raise ValueError("triton_stack_merge: the norm weight must be [d] in the partial sum's dtype")
    o = o if o.stride(1) == 1 else o.contiguous()
    p = p if p.stride(1) == 1 else p.contiguous()
    q = q.contiguous()
    w = q if weight is None else weight.contiguous()  # a placeholder pointer when not normalising
    meta = _merge_meta(m, d)
    out = _empty((m, d), p.dtype, p.device)
    kernels.stack_merge_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
        o, o.stride(0), lse, lse.stride(0), p, p.stride(0), p_rstd, p_rstd.stride(0), q, w, out, m, d,
        float(eps), NORM=weight is not None, **meta,
    )  # fmt: skip
    return out


@triton_stack_merge.register_fake
def _(
    o: Tensor, lse: Tensor, p: Tensor, p_rstd: Tensor, q: Tensor, weight: Tensor | None, eps: float
) -> Tensor:
    return p.new_empty(p.shape)


def stack_phase1(
    values: Tensor, rstd: Tensor, n: int, queries: Tensor, need_lse: bool
) -> tuple[Tensor, Tensor]:
    """:func:`triton_stack_phase1`, refusing inputs that require a gradient under grad mode."""
    _refuse_grad("triton_stack_phase1", values, rstd, queries)
    return triton_stack_phase1(values, rstd, n, queries, need_lse)


def stack_merge(
    o: Tensor, lse: Tensor, p: Tensor, p_rstd: Tensor, q: Tensor, weight: Tensor | None, eps: float
) -> Tensor:
    """:func:`triton_stack_merge`, refusing inputs that require a gradient under grad mode."""
    _refuse_grad("triton_stack_merge", o, lse, p, p_rstd, q, weight)
    return triton_stack_merge(o, lse, p, p_rstd, q, weight, eps)
