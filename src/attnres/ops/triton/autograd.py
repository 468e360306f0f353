"""The Triton kernels as custom ops, drop-in twins of ``fused._DepthAttend`` and ``two_phase._Merge``.

Same inputs, outputs, dtypes and backward math as the PyTorch functions (see their module
docstrings); only the work moves into :mod:`attnres.ops.triton.kernels`. Importing this module
imports Triton.

Each launch sequence is a ``torch.library.custom_op`` (``attnres::triton_attend``,
``attnres::triton_merge`` and their ``*_backward``) with a fake implementation and a registered
backward, so ``torch.compile(fullgraph=True)`` keeps it as one node of its graph, eager and
compiled calls run the same code, and the ops pass ``torch.library.opcheck``. Not
``torch.library.triton_op``: its fake implementation is the launching function itself, which
under ``TRITON_INTERPRET=1`` (the CPU tests) would run the interpreter on fake tensors; and
inductor gains little from seeing these kernels, which it cannot fuse with their neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


@torch.library.custom_op("attnres::triton_attend", mutates_args=())
def triton_attend(
    sources: list[Tensor], rstd: list[Tensor], queries: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``S ≤ 8`` folded queries ``[S, d]`` against ``N`` listed sources ``[..., d]``, in Triton.

    Returns ``outs [S, M, d]``, ``lse [M, S]`` and ``dots [N, M, S]`` (``v · q``, saved for the
    backward, which recomputes ``α`` from it and ``lse``), all in the statistics dtype.
    """
    n_src = len(sources)
    sources = [v.contiguous() for v in sources]  # no copy for the usual contiguous source
    rstd = [r.contiguous() for r in rstd]
    queries = queries.contiguous()  # the kernels index rows of d
    d = sources[0].shape[-1]
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
    return out, lse, dots


@triton_attend.register_fake
def _(sources: list[Tensor], rstd: list[Tensor], queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, n_q = sources[0].shape[-1], queries.shape[0]
    m = sources[0].numel() // d
    return (
        queries.new_empty((n_q, m, d)),
        queries.new_empty((m, n_q)),
        queries.new_empty((len(sources), m, n_q)),
    )


@torch.library.custom_op("attnres::triton_attend_backward", mutates_args=())
def triton_attend_backward(
    sources: list[Tensor],
    rstd: list[Tensor],
    queries: Tensor,
    dots: Tensor,
    lse: Tensor,
    grads: list[Tensor],
    grad_lse: Tensor,
) -> list[Tensor]:
    """The backward of :func:`triton_attend`: ``N`` source, ``N`` rstd and the query gradients.

    ``grads`` are the ``S`` output gradients ``[M, d]`` and ``grad_lse`` is ``[M, S]``; returns the
    source gradients (each source's shape and dtype), then the rstd gradients, then ``∂q [S, d]``.
    """
    n_src = len(sources)
    sources = [v.contiguous() for v in sources]
    rstd = [r.contiguous() for r in rstd]
    d, n_q, cd, dev = queries.shape[1], queries.shape[0], queries.dtype, queries.device
    m = sources[0].numel() // d
    meta = _attend_meta(d, n_q)
    g_out = [g.reshape(m, d).contiguous() for g in grads]  # n_q × [M, d]
    g_lse = grad_lse.reshape(m, n_q).contiguous()
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
    return [*d_sources, *d_rstd, dq.sum(0)]


@triton_attend_backward.register_fake
def _(
    sources: list[Tensor], rstd: list[Tensor], queries: Tensor, *_statistics_and_grads: Tensor
) -> list[Tensor]:
    # the gradients' shapes follow the inputs alone (dots, lse and the gradients are not read)
    return [
        *(torch.empty_like(v) for v in sources),
        *(queries.new_empty(r.shape) for r in rstd),
        torch.empty_like(queries),
    ]


def _attend_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    sources, rstd, queries = inputs
    _, lse, dots = output
    ctx.n_src = len(sources)
    ctx.save_for_backward(queries, dots, lse, *sources, *rstd)


@no_autocast
def _attend_backward(ctx: Any, g_out: Tensor, g_lse: Tensor, _: Tensor) -> tuple[Any, ...]:
    # grads are materialised (autograd's default): zeros for outputs the graph did not use
    queries, dots, lse, *rest = ctx.saved_tensors
    n = ctx.n_src
    grads = triton_attend_backward(rest[:n], rest[n:], queries, dots, lse, list(g_out.unbind(0)), g_lse)
    return grads[:n], grads[n : 2 * n], grads[2 * n]


triton_attend.register_autograd(_attend_backward, setup_context=_attend_setup_context)


def depth_attend(
    sources: Sequence[Tensor], rstd: Sequence[Tensor], queries: Tensor
) -> tuple[tuple[Tensor, ...], Tensor]:
    """:func:`attnres.ops.fused.depth_attend` in Triton; arguments already validated by it.

    More than :data:`MAX_QUERIES` queries run as several op calls of at most eight: the queries
    are independent, and each call reads every source once.
    """
    shape = sources[0].shape
    outs, lses = [], []
    for s0 in range(0, queries.shape[0], MAX_QUERIES):
        o, lse, _ = triton_attend(list(sources), list(rstd), queries[s0 : s0 + MAX_QUERIES])
        outs += [x.view(shape) for x in o.unbind(0)]
        lses.append(lse.view(*shape[:-1], -1))
    return tuple(outs), lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)


def _merge_meta(d: int) -> dict[str, int]:
    block_d = min(triton.next_power_of_2(d), 256)
    return {"BLOCK_M": max(1, min(64, _TILE // block_d)), "BLOCK_D": block_d}


@torch.library.custom_op("attnres::triton_merge", mutates_args=())
def triton_merge(
    o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h = o + σ(r_p (p · q) − lse) (p − o)`` in Triton; contract of ``two_phase._Merge``.

    Returns the output (``p``'s dtype) and, for the backward, the unrounded ``h`` in the statistics
    dtype when ``p``'s dtype is lower (else an empty tensor: the output is ``h``), ``σ`` and
    ``p · q`` ``[M]``.
    """
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
    return out, h if save_h else q.new_empty(0), sig, dot


@triton_merge.register_fake
def _(o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m = p.numel() // p.shape[-1]
    h = q.new_empty(p.shape) if p.dtype != q.dtype else q.new_empty(0)
    return torch.empty_like(p, memory_format=torch.contiguous_format), h, q.new_empty(m), q.new_empty(m)


@torch.library.custom_op("attnres::triton_merge_backward", mutates_args=())
def triton_merge_backward(
    g: Tensor, h: Tensor, p: Tensor, r_p: Tensor, sig: Tensor, dot: Tensor, q: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`triton_merge`: ``∂o, ∂lse, ∂p, ∂r_p, ∂q`` given ``g = ∂h``."""
    d, cd, dev = p.shape[-1], q.dtype, p.device
    m = p.numel() // d
    h, p, r_p = h.contiguous(), p.contiguous(), r_p.contiguous()
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
    return d_o, d_lse, d_p, d_rp, dq.sum(0)


@triton_merge_backward.register_fake
def _(
    g: Tensor, h: Tensor, p: Tensor, r_p: Tensor, sig: Tensor, dot: Tensor, q: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        q.new_empty(p.shape),
        q.new_empty(r_p.shape),
        p.new_empty(p.shape),
        q.new_empty(r_p.shape),
        torch.empty_like(q),
    )


def _merge_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _, _, p, r_p, q = inputs
    out, h, sig, dot = output
    ctx.save_for_backward(h if h.numel() else out, p, r_p, sig, dot, q)


@no_autocast
def _merge_backward(ctx: Any, g: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    h, p, r_p, sig, dot, q = ctx.saved_tensors
    d_o, d_lse, d_p, d_rp, dq = triton_merge_backward(g, h, p, r_p, sig, dot, q)
    return d_o, d_lse, d_p, d_rp, dq if ctx.needs_input_grad[4] else None


triton_merge.register_autograd(_merge_backward, setup_context=_merge_setup_context)


def merge(o: Tensor, lse: Tensor, p: Tensor, r_p: Tensor, q: Tensor) -> Tensor:
    """The phase-2 merge in Triton; arguments as ``two_phase._Merge.apply`` takes them."""
    return triton_merge(o, lse, p, r_p, q)[0]
