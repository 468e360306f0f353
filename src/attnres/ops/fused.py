"""Fast depth reads in plain PyTorch: custom autograd, no ``torch.stack`` of the sources.

Two autograd functions do all the work; everything else composes them:

* :func:`source_rstd` computes a source's per-token ``r = rsqrt(mean(v²) + eps)`` once. A residual
  scheme keeps it next to the source, so every read that sees the source reuses it, and autograd
  sums the ``∂/∂r`` of all those reads before going back through ``v`` once.
* :func:`depth_attend` runs ``S`` folded queries ``q_s = w_s ⊙ γ_s`` against ``N`` sources, taking
  the sources as a list (never stacked) and their cached ``r``. It returns the ``S`` normalised
  outputs and the log-sum-exp per token. One query is the fused per-read path
  (:func:`fused_depth_read`); ``S`` queries are phase 1 of the two-phase computation
  (:mod:`attnres.ops.two_phase`).

The math, per token (``z`` are the logits, ``α`` the softmax over sources)::

    z_sj = r_j (v_j · q_s),   α_sj = exp(z_sj - lse_s),   o_s = Σ_j α_sj v_j

and its backward, with ``g_s = ∂/∂o_s`` and ``λ_s = ∂/∂lse_s``::

    ∂z_sj = α_sj (g_s · v_j − g_s · o_s + λ_s)        where g_s · o_s = Σ_j α_sj (g_s · v_j)
    ∂v_j  = Σ_s α_sj g_s + Σ_s ∂z_sj r_j q_s
    ∂q_s  = Σ_tokens Σ_j ∂z_sj r_j v_j
    ∂r_j  = Σ_s ∂z_sj (v_j · q_s)

The backward keeps only references to the sources (which the model holds anyway) and per-token
statistics ``α`` and ``v_j · q_s`` (``N·S`` scalars per token); nothing ``d``-wide is saved.
Statistics run in fp32 (fp64 for fp64 inputs), with autocast off
(:func:`attnres.ops.precision.no_autocast`); outputs are fp32 and callers cast them back.

On CPU, :func:`depth_attend` runs native kernels (:mod:`attnres.ops.native`, through the custom op
``attnres::native_attend``, eager and under ``torch.compile``) that do all of this one token at a
time, reading each source once per read; the PyTorch ops below are their twin, used on other
devices, wherever the kernels cannot be built, and when ``torch`` kernels are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnres.ops import triton as triton_ops
from attnres.ops.dispatch import kernels_for
from attnres.ops.native import native_attend
from attnres.ops.precision import no_autocast, stats_dtype


@no_autocast
def rstd_stat(v: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(v²) + eps)`` over the last dim ``[...]``, in the statistics dtype; no autograd."""
    cd = stats_dtype(v.dtype)
    norm = torch.linalg.vector_norm(v, dim=-1, dtype=None if v.dtype == cd else cd)  # [...]
    # eps + norm² / d in one op: on one-token decode steps, op count is the cost, and in-place
    # ops with Python scalars each cost a wrapped-scalar conversion.
    return torch.addcmul(norm.new_full((), eps), norm, norm, value=1 / v.shape[-1]).rsqrt_()


class _SourceRstd(torch.autograd.Function):
    """``r = rsqrt(mean(v²) + eps)`` over the last dim; ``∂v = −∂r · r³ · v / d``."""

    @staticmethod
    def forward(ctx, v: Tensor, eps: float) -> Tensor:
        r = rstd_stat(v, eps)  # [...]
        ctx.save_for_backward(v, r)
        return r

    @staticmethod
    @no_autocast
    def backward(ctx, dr: Tensor) -> tuple[Tensor, None]:
        v, r = ctx.saved_tensors
        coef = (dr * r.pow(3)).div_(-v.shape[-1]).unsqueeze(-1)  # [..., 1]
        return (coef * v).to(v.dtype), None


def source_rstd(v: Tensor, eps: float) -> Tensor:
    """Per-token ``rsqrt(mean(v²) + eps)`` of a source ``[..., d]``, in the statistics dtype ``[...]``.

    Compute it once per source and pass it to every read that sees the source.
    """
    return _SourceRstd.apply(v, eps)


def _attend(
    queries: Tensor, sources: Sequence[Tensor], rstd: Sequence[Tensor]
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """The forward math: ``S`` outputs ``[..., d]``, ``lse [..., S]``, and ``α``, ``v·q`` ``[N, M, S]``."""
    d = sources[0].shape[-1]
    cd = queries.dtype
    flat = [v.reshape(-1, d) for v in sources]  # N × [M, d]; views for contiguous sources
    # [N, M, S]: one pass over each source serves all S queries
    dots = torch.stack([(v if v.dtype == cd else v.to(cd)) @ queries.T for v in flat])
    logits = dots * torch.stack([r.reshape(-1) for r in rstd]).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=0)  # [M, S]
    alpha = logits.sub_(lse).exp_()  # [N, M, S]
    outs = []
    for s in range(queries.shape[0]):
        o = flat[0] * alpha[0, :, s, None]  # promotes to the statistics dtype
        for j in range(1, len(flat)):
            o.addcmul_(flat[j], alpha[j, :, s, None])
        outs.append(o.view(sources[0].shape))
    return outs, lse.view(*sources[0].shape[:-1], -1), alpha, dots


def _attend_native(
    queries: Tensor, sources: Sequence[Tensor], rstd: Sequence[Tensor]
) -> tuple[tuple[Tensor, ...], Tensor]:
    """The native kernels' custom op (:func:`attnres.ops.native.native_attend`; differentiable)."""
    shape, d = sources[0].shape, sources[0].shape[-1]
    flat = [v.reshape(-1, d).contiguous() for v in sources]  # N × [M, d]; views when contiguous
    outs, lse, _, _ = native_attend(flat, [r.reshape(-1) for r in rstd], queries.contiguous())
    # outs [S, M, d]; lse [M, S]
    return tuple(o.view(shape) for o in outs.unbind(0)), lse.view(*shape[:-1], -1)


class _DepthAttend(torch.autograd.Function):
    """``S`` folded queries against ``N`` listed sources; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, queries: Tensor, n_src: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        sources, rstd = tensors[:n_src], tensors[n_src:]
        outs, lse, alpha, dots = _attend(queries, sources, rstd)
        ctx.n_src = n_src
        ctx.save_for_backward(queries, alpha, dots, *sources, *rstd)
        return (*outs, lse)

    @staticmethod
    @no_autocast
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        queries, alpha, dots, *rest = ctx.saved_tensors
        n_src = ctx.n_src
        sources, rstd = rest[:n_src], rest[n_src:]
        d = sources[0].shape[-1]
        cd = queries.dtype
        n_q = queries.shape[0]
        flat = [v.reshape(-1, d) for v in sources]
        g_out = [None if g is None else g.reshape(-1, d).to(cd) for g in grads[:n_q]]
        g_lse = grads[n_q]
        # dalpha[j, :, s] = g_s · v_j                                          [N, M, S]
        dalpha = torch.zeros_like(alpha)
        for s, g in enumerate(g_out):
            if g is not None:
                for j, v in enumerate(flat):
                    dalpha[j, :, s] = torch.linalg.vecdot(v.to(cd), g)
        dz = dalpha.sub_((alpha * dalpha).sum(0))
        if g_lse is not None:
            dz.add_(g_lse.reshape(1, -1, n_q).to(cd))
        dz.mul_(alpha)  # ∂z  [N, M, S]
        r = torch.stack([x.reshape(-1) for x in rstd]).unsqueeze(-1)  # [N, M, 1]
        coef = dz * r  # ∂z · r  [N, M, S]
        d_queries = torch.zeros_like(queries) if ctx.needs_input_grad[0] else None
        d_sources, d_rstd = [], []
        for j, v in enumerate(flat):
            vc = v if v.dtype == cd else v.to(cd)
            if d_queries is not None:
                d_queries.addmm_(coef[j].T, vc)  # [S, M] @ [M, d]
            if ctx.needs_input_grad[2 + j]:  # inputs: queries, n_src, *sources, *rstd
                dv = coef[j] @ queries  # [M, S] @ [S, d]
                for s, g in enumerate(g_out):
                    if g is not None:
                        dv.addcmul_(g, alpha[j, :, s, None])
                d_sources.append(dv.to(v.dtype).view(sources[j].shape))
            else:
                d_sources.append(None)
            d_rstd.append((dz[j] * dots[j]).sum(-1).view(rstd[j].shape))
        return (d_queries, None, *d_sources, *d_rstd)


@no_autocast
def depth_attend(
    sources: Sequence[Tensor], rstd: Sequence[Tensor], queries: Tensor
) -> tuple[tuple[Tensor, ...], Tensor]:
    """``S`` folded queries against ``N`` sources, without stacking the sources.

    Args:
        sources: ``N ≥ 1`` tensors ``[..., d]`` of one shape and dtype.
        rstd: each source's :func:`source_rstd`, ``[...]``.
        queries: folded queries ``q_s = w_s ⊙ γ_s``, ``[S, d]`` in the statistics dtype.

    Returns:
        ``(outs, lse)``: ``S`` normalised outputs ``o_s = Σ_j α_sj v_j`` ``[..., d]`` and the
        log-sum-exp of the logits ``[..., S]``, all in the statistics dtype.

    Runs on the Triton kernels where :func:`attnres.ops.dispatch.kernels_for` says so (CUDA).
    """
    if len(sources) == 0:
        raise ValueError("a depth read needs at least one source")
    if len(rstd) != len(sources):
        raise ValueError(f"got {len(sources)} sources but {len(rstd)} rstd statistics; pass one per source")
    shape, d = sources[0].shape, sources[0].shape[-1]
    if queries.dim() != 2 or queries.shape[1] != d:
        raise ValueError(f"queries must be [S, d={d}], got {tuple(queries.shape)}")
    for v in sources:
        if v.shape != shape or v.dtype != sources[0].dtype:
            raise ValueError(
                f"all sources must share shape and dtype; got {tuple(v.shape)} {v.dtype} "
                f"vs {tuple(shape)} {sources[0].dtype}"
            )
    queries = queries.to(stats_dtype(sources[0].dtype))
    kernels = kernels_for(sources[0])
    if kernels == "triton":
        return triton_ops.depth_attend(sources, rstd, queries)
    if kernels == "native":
        return _attend_native(queries, sources, rstd)
    if not torch.is_grad_enabled():  # nothing to save for a backward pass
        outs, lse, _, _ = _attend(queries, sources, rstd)
        return tuple(outs), lse
    *outs, lse = _DepthAttend.apply(queries, len(sources), *sources, *rstd)
    return tuple(outs), lse


def fold_query(query: Tensor, gain: Tensor, dtype: torch.dtype) -> Tensor:
    """``w ⊙ γ`` in the statistics dtype of a ``dtype`` stream: the gain folded into the query."""
    cd = stats_dtype(dtype)
    return query.to(cd) * gain.to(cd)


def fused_depth_read(
    sources: Sequence[Tensor],
    query: Tensor,
    gain: Tensor,
    eps: float = 1e-6,
    rstd: Sequence[Tensor] | None = None,
) -> Tensor:
    """One depth read, equal to :func:`attnres.ops.reference.depth_read` up to rounding.

    Args:
        sources: ``N ≥ 1`` tensors ``[..., d]`` of one dtype and shape; never stacked.
        query: pseudo-query ``w`` ``[d]``.
        gain: key RMSNorm gain ``γ`` ``[d]``; folded into the query.
        eps: RMS epsilon (only used when ``rstd`` is computed here).
        rstd: cached :func:`source_rstd` of each source. Pass it when several reads see the
            same sources; computed here when ``None``.

    Returns:
        ``[..., d]`` in the sources' dtype.
    """
    if len(sources) == 0:
        raise ValueError("a depth read needs at least one source")
    if rstd is None:
        rstd = [source_rstd(v, eps) for v in sources]
    q = fold_query(query, gain, sources[0].dtype).unsqueeze(0)  # [1, d]
    (out,), _ = depth_attend(sources, rstd, q)
    return out.to(sources[0].dtype)
