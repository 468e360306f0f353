"""Autograd functions over the Triton kernels, drop-in twins of ``fused._DepthAttend`` and ``_Merge``.

Same inputs, outputs, dtypes and backward math as the PyTorch functions (see their module
docstrings); only the work moves into :mod:`attnres.ops.triton.kernels`. Importing this module
imports Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from attnres.ops.precision import no_autocast
from attnres.ops.triton import kernels

SLOTS = 8  # source pointer arguments per launch; a read over more sources takes several launches
MAX_QUERIES = 8  # queries per autograd call (the kernels take S ≤ 8 gradients as pointer slots)
_TILE = 4096  # elements per [BLOCK_M, S_PAD, BLOCK_D] register tile


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel writes is allocated here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _slots(tensors: Sequence[Tensor]) -> list[Tensor]:
    """A chunk of at most :data:`SLOTS` tensors padded to :data:`SLOTS` pointer arguments.

    The padding repeats the first tensor; the kernel never touches slots past ``N_SLOTS``.
    """
    return [*tensors, *([tensors[0]] * (SLOTS - len(tensors)))]


def _attend_meta(d: int, n_q: int) -> dict[str, int]:
    """Compile-time sizes of the attend kernels for ``d`` channels and ``n_q ≤ 8`` queries."""
    s_pad = triton.next_power_of_2(n_q)
    block_d = min(triton.next_power_of_2(d), 128)
    block_m = max(1, min(64, _TILE // (s_pad * block_d)))  # powers of two, so this is one too
    return {"S": n_q, "S_PAD": s_pad, "BLOCK_M": block_m, "BLOCK_D": block_d}


class _TritonDepthAttend(torch.autograd.Function):
    """``S ≤ 8`` folded queries against ``N`` listed sources, in Triton; contract of ``fused._DepthAttend``.

    Saves the queries, ``dots [N, M, S]`` and ``lse [M, S]`` besides references to the sources
    and their ``rstd``; the backward recomputes ``α`` from them.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, n_src: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        sources = [v.contiguous() for v in tensors[:n_src]]  # no copy for the usual contiguous source
        rstd = [r.contiguous() for r in tensors[n_src:]]
        queries = queries.contiguous()  # the kernels index rows of d
        shape, d = sources[0].shape, sources[0].shape[-1]
        m, n_q, cd, dev = sources[0].numel() // d, queries.shape[0], queries.dtype, queries.device
        meta = _attend_meta(d, n_q)
        dots = _empty((n_src, m, n_q), cd, dev)
        lse = _empty((m, n_q), cd, dev)
        out = _empty((n_q, m, d), cd, dev)
        grid_m = triton.cdiv(m, meta["BLOCK_M"])
        # all logits first: the output pass needs the final lse of every source
        for j0 in range(0, n_src, SLOTS):
            vs, rs = sources[j0 : j0 + SLOTS], rstd[j0 : j0 + SLOTS]
            kernels.attend_logits_kernel[(grid_m,)](
                queries, *_slots(vs), *_slots(rs), dots[j0:], lse, m, d,
                N_SLOTS=len(vs), ACCUM=j0 > 0, **meta,
            )  # fmt: skip
        for j0 in range(0, n_src, SLOTS):
            vs, rs = sources[j0 : j0 + SLOTS], rstd[j0 : j0 + SLOTS]
            kernels.attend_output_kernel[(grid_m, triton.cdiv(d, meta["BLOCK_D"]))](
                *_slots(vs), *_slots(rs), dots[j0:], lse, out, m, d,
                N_SLOTS=len(vs), ACCUM=j0 > 0, **meta,
            )  # fmt: skip
        ctx.n_src = n_src
        ctx.save_for_backward(queries, dots, lse, *sources, *rstd)
        return (*(o.view(shape) for o in out), lse.view(*shape[:-1], n_q))

    @staticmethod
    @no_autocast
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        # grads are materialised (autograd's default): zeros for outputs the graph did not use
        queries, dots, lse, *rest = ctx.saved_tensors
        n_src = ctx.n_src
        sources, rstd = rest[:n_src], rest[n_src:]
        d, n_q, cd, dev = queries.shape[1], queries.shape[0], queries.dtype, queries.device
        m = sources[0].numel() // d
        meta = _attend_meta(d, n_q)
        g_out = [g.reshape(m, d).contiguous() for g in grads[:n_q]]  # n_q × [M, d]
        g_lse = grads[n_q].reshape(m, n_q).contiguous()
        grid_m = triton.cdiv(m, meta["BLOCK_M"])
        dalpha = _empty((n_src, m, n_q), cd, dev)
        gbar = _empty((m, n_q), cd, dev)
        d_sources = [_empty(v.shape, v.dtype, dev) for v in sources]
        d_rstd = [_empty(r.shape, cd, dev) for r in rstd]
        dq = _empty((grid_m, n_q, d), cd, dev)  # per token block; summed below
        # gbar_s = g_s · o_s needs every source before any ∂z: a full pass first, as in the forward
        for j0 in range(0, n_src, SLOTS):
            vs, rs = sources[j0 : j0 + SLOTS], rstd[j0 : j0 + SLOTS]
            kernels.attend_grad_stats_kernel[(grid_m,)](
                *_slots(vs), *_slots(rs), *_slots(g_out), dots[j0:], lse, dalpha[j0:], gbar, m, d,
                N_SLOTS=len(vs), ACCUM=j0 > 0, **meta,
            )  # fmt: skip
        for j0 in range(0, n_src, SLOTS):
            vs, rs = sources[j0 : j0 + SLOTS], rstd[j0 : j0 + SLOTS]
            kernels.attend_grad_kernel[(grid_m, triton.cdiv(d, meta["BLOCK_D"]))](
                queries, *_slots(vs), *_slots(rs), *_slots(g_out),
                *_slots(d_sources[j0 : j0 + SLOTS]), *_slots(d_rstd[j0 : j0 + SLOTS]),
                dots[j0:], lse, dalpha[j0:], gbar, g_lse, dq, m, d,
                N_SLOTS=len(vs), ACCUM=j0 > 0, **meta,
            )  # fmt: skip
        needs = ctx.needs_input_grad
        return (
            dq.sum(0) if needs[0] else None,
            None,
            *(dv if needs[2 + j] else None for j, dv in enumerate(d_sources)),
            *(dr if needs[2 + n_src + j] else None for j, dr in enumerate(d_rstd)),
        )


def depth_attend(
    sources: Sequence[Tensor], rstd: Sequence[Tensor], queries: Tensor
) -> tuple[tuple[Tensor, ...], Tensor]:
    """:func:`attnres.ops.fused.depth_attend` in Triton; arguments already validated by it.

    More than :data:`MAX_QUERIES` queries run as several autograd calls of at most eight: the
    queries are independent, and each call reads every source once.
    """
    outs, lses = [], []
    for s0 in range(0, queries.shape[0], MAX_QUERIES):
        *o, lse = _TritonDepthAttend.apply(queries[s0 : s0 + MAX_QUERIES], len(sources), *sources, *rstd)
        outs += o
        lses.append(lse)
    return tuple(outs), lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)


def _merge_meta(d: int) -> dict[str, int]:
    block_d = min(triton.next_power_of_2(d), 256)
    return {"BLOCK_M": max(1, min(64, _TILE // block_d)), "BLOCK_D": block_d}


class _TritonMerge(torch.autograd.Function):
    """``h = o + σ(r_p (p · q) − lse) (p − o)`` in Triton; contract of ``two_phase._Merge``."""

    @staticmethod
    def forward(ctx, o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> Tensor:
        d, cd, dev = p.shape[-1], q.dtype, p.device
        m = p.numel() // d
        o, lse, p, r_p, q = o.contiguous(), lse.contiguous(), p.contiguous(), r_p.contiguous(), q.contiguous()
        meta = _merge_meta(d)
        out = _empty(p.shape, p.dtype, dev)
        # p − h cancels when σ → 1, so a low-precision stream keeps the unrounded h for backward
        save_h = p.dtype != cd
        h = _empty(p.shape, cd, dev) if save_h else out
        sig = _empty((m,), cd, dev)
        dot = _empty((m,), cd, dev)
        kernels.merge_kernel[(triton.cdiv(m, meta["BLOCK_M"]),)](
            o, lse, p, r_p, q, out, h, sig, dot, m, d, SAVE_H=save_h, **meta
        )
        ctx.save_for_backward(h, p, r_p, sig, dot, q)
        return out

    @staticmethod
    @no_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        h, p, r_p, sig, dot, q = ctx.saved_tensors
        d, cd, dev = p.shape[-1], q.dtype, p.device
        m = p.numel() // d
        meta = _merge_meta(d)
        grid_m = triton.cdiv(m, meta["BLOCK_M"])
        d_o = _empty(p.shape, cd, dev)
        d_p = _empty(p.shape, p.dtype, dev)
        d_lse = _empty(r_p.shape, cd, dev)
        d_rp = _empty(r_p.shape, cd, dev)
        dq = _empty((grid_m, d), cd, dev)  # per token block; summed below
        kernels.merge_grad_kernel[(grid_m,)](
            g.contiguous(), h, p, r_p, sig, dot, q, d_o, d_p, d_lse, d_rp, dq, m, d, **meta
        )
        return d_o, d_lse, d_p, d_rp, dq.sum(0) if ctx.needs_input_grad[4] else None


def merge(o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> Tensor:
    """The phase-2 merge in Triton; arguments as ``two_phase._Merge.apply`` takes them."""
    return _TritonMerge.apply(o, lse, p, r_p, q)
