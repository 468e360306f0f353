"""Two-phase depth reads (SPEC §4; paper §4.2, Algorithm 1), forward and backward.

The ``S`` reads of a group see the same completed blocks ``b_0 … b_g`` and differ only in their
folded query and in the live partial sum ``p`` that later reads add. So:

* **Phase 1** (:func:`phase1`): all ``S`` queries against the completed blocks in one pass over
  the blocks, returning per read the normalised output ``o`` and the log-sum-exp ``lse``. This is
  :func:`attnres.ops.fused.depth_attend` with ``S`` queries.
* **Phase 2** (:func:`phase2_merge`): each later read adds one logit ``x = r_p (p · q)`` for the
  partial sum and merges online: ``h = o + σ(x − lse) · (p − o)``. The convex form keeps ``o`` a
  weighted mean, so its rounding does not grow when the softmax is flat.

The merge's backward needs ``p − o``; it uses ``p − h = (1 − σ)(p − o)`` instead, so it saves the
read's output ``h`` (which the next sublayer's norm keeps anyway; unrounded in fp32 for bf16
streams) rather than ``o``:

    ∂x = σ · (g · (p − h)),   ∂o = (1 − σ) g,   ∂p = σ g + ∂x r_p q,
    ∂lse = −∂x,   ∂q = Σ_tokens ∂x r_p p,   ∂r_p = ∂x (p · q)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnres.ops import triton as triton_ops
from attnres.ops.dispatch import kernels_for
from attnres.ops.fused import depth_attend, fold_query
from attnres.ops.precision import no_autocast, stats_dtype


def phase1(
    sources: Sequence[Tensor], rstd: Sequence[Tensor], queries: Tensor, gains: Tensor
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Phase 1: ``S`` read sites against the completed blocks in one batched pass.

    Args:
        sources: the group's completed blocks ``b_0 … b_g``, each ``[..., d]``.
        rstd: each block's :func:`attnres.ops.fused.source_rstd`.
        queries: the ``S`` pseudo-queries ``w`` ``[S, d]``.
        gains: their key gains ``γ`` ``[S, d]``; folded into the queries.

    Returns:
        ``(outs, lse)``: ``S`` outputs ``[..., d]`` and ``lse [..., S]`` in the statistics dtype.
    """
    return depth_attend(sources, rstd, fold_query(queries, gains, sources[0].dtype))


class _Merge(torch.autograd.Function):
    """``h = o + σ(r_p (p · q) − lse) (p − o)``; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> Tensor:
        d = p.shape[-1]
        cd = q.dtype
        p2 = p.reshape(-1, d)  # [M, d]
        pc = p2 if p2.dtype == cd else p2.to(cd)
        dot = pc @ q  # [M]
        sig = torch.sigmoid(dot * r_p.reshape(-1) - lse.reshape(-1))  # [M]
        h = torch.lerp(o.reshape(-1, d), pc, sig.unsqueeze(-1))  # [M, d], statistics dtype
        out = h.to(p.dtype).view(p.shape)
        # p − h cancels when σ → 1, so a low-precision stream keeps the unrounded h for backward;
        # an fp32/fp64 stream saves its own output, which the next sublayer's norm keeps anyway.
        ctx.save_for_backward(out if out.dtype == cd else h, p, r_p, sig, dot, q)
        return out

    @staticmethod
    @no_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        h, p, r_p, sig, dot, q = ctx.saved_tensors
        d = p.shape[-1]
        cd = q.dtype
        gc = g.reshape(-1, d).to(cd)  # [M, d]
        pc = p.reshape(-1, d).to(cd)
        dx = sig * torch.linalg.vecdot(gc, pc - h.reshape(-1, d).to(cd))  # [M]
        coef = dx * r_p.reshape(-1)
        d_o = gc * (1 - sig).unsqueeze(-1)
        d_p = (gc * sig.unsqueeze(-1)).addr_(coef, q)
        d_q = coef @ pc if ctx.needs_input_grad[4] else None
        return (
            d_o.view(p.shape),
            (-dx).view(r_p.shape),
            d_p.to(p.dtype).view(p.shape),
            (dx * dot).view(r_p.shape),
            d_q,
        )


@no_autocast
def phase2_merge(
    o: Tensor, lse: Tensor, partial: Tensor, partial_rstd: Tensor, query: Tensor, gain: Tensor
) -> Tensor:
    """Phase 2: merge a phase-1 result with the live partial sum.

    Args:
        o: the read's phase-1 output ``[..., d]`` (statistics dtype).
        lse: its phase-1 log-sum-exp ``[...]``.
        partial: the live partial sum ``[..., d]`` (stream dtype).
        partial_rstd: its :func:`attnres.ops.fused.source_rstd` ``[...]``.
        query, gain: the read site's ``w`` and ``γ`` ``[d]``.

    Returns:
        The read's output ``[..., d]`` in the partial's dtype, equal to a softmax read over the
        phase-1 sources plus ``partial``. Runs on the Triton kernels where
        :func:`attnres.ops.dispatch.kernels_for` says so (CUDA).
    """
    cd = stats_dtype(partial.dtype)
    if o.shape != partial.shape or lse.shape != partial.shape[:-1]:
        raise ValueError(
            f"phase-2 shapes disagree: o {tuple(o.shape)}, lse {tuple(lse.shape)}, "
            f"partial {tuple(partial.shape)}; o must match partial and lse drop its last dim"
        )
    args = (o.to(cd), lse.to(cd), partial, partial_rstd, fold_query(query, gain, partial.dtype))
    return triton_ops.merge(*args) if kernels_for(partial) == "triton" else _Merge.apply(*args)
