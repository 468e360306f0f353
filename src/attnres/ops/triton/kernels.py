"""Triton kernels of the depth attend and the phase-2 merge (launched by :mod:`.autograd`), and of the
no-grad reads over a stack of blocks (launched by :mod:`.stacked`; layouts in their section below).

Importing this module imports Triton; only :mod:`.autograd` and :mod:`.stacked` do, lazily.

Layouts (``M`` tokens, ``d`` channels, ``S ≤ 8`` queries, statistics dtype ``cd``):

* a source ``v_j`` and a gradient ``g_s``: ``[M, d]`` row-major, any float dtype;
* ``rstd_j``: ``[M]`` in ``cd``; queries ``[S, d]`` in ``cd``;
* per-token statistics of a launch's chunk of sources: ``dots [n, M, S]`` (``v_j · q_s``),
  ``lse``, ``gbar`` (``g_s · o_s``) and ``glse`` (``∂/∂lse``) ``[M, S]``;
* outputs ``o [S, M, d]`` in ``cd``.

A kernel takes eight source slots (``v0 … v7``, ``r0 … r7``) and uses the first ``N_SLOTS``;
:func:`_slot` resolves a slot at compile time, so a slot costs nothing when unused. ``S_PAD`` is
``S`` rounded up to a power of two (``tl.arange`` needs one); padded query columns are masked.
``ACCUM`` marks a launch after the first of a read: it adds to what the earlier launches wrote.

Every tile is ``[BLOCK_M tokens, BLOCK_D channels]`` with the ``d`` dimension masked, so any
``d`` works. Offsets are int64, so ``M · d`` may exceed 2³¹.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slot(j: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """Pointer argument ``j`` of eight; ``j`` is a compile-time constant, so this is free."""
    # a Triton function cannot index a dict or tuple of pointers by a loop variable: branch instead
    if j == 0:  # noqa: SIM116
        return p0
    elif j == 1:
        return p1
    elif j == 2:
        return p2
    elif j == 3:
        return p3
    elif j == 4:
        return p4
    elif j == 5:
        return p5
    elif j == 6:
        return p6
    else:
        return p7


@triton.jit
def _tile(ptr, rows, cols, row_mask, d, cd: tl.constexpr):
    """Rows ``rows`` and columns ``cols`` of a row-major ``[M, d]`` tensor, as ``cd``; 0 outside."""
    mask = row_mask[:, None] & (cols < d)[None, :]
    return tl.load(ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0).to(cd)


@triton.jit
def _stat_offsets(rows, qs, row_mask, S: tl.constexpr):
    """Offsets and mask of the ``[BLOCK_M, S_PAD]`` block of an ``[M, S]`` statistic."""
    return rows[:, None] * S + qs[None, :], row_mask[:, None] & (qs < S)[None, :]


@triton.jit
def _alpha(dots_ptr, r_ptr, lse, offs, mask, rows, row_mask):
    """``α = exp(r (v · q) − lse)`` of one source, ``[BLOCK_M, S_PAD]`` (0 where masked), and its dots."""
    dot = tl.load(dots_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)
    return tl.where(mask, tl.exp(dot * r[:, None] - lse), 0.0), dot, r


@triton.jit
def attend_logits_kernel(
    q_ptr, v0, v1, v2, v3, v4, v5, v6, v7, r0, r1, r2, r3, r4, r5, r6, r7,
    dots_ptr, lse_ptr, M, d,
    N_SLOTS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    """Forward, pass 1 (grid: token blocks): ``dots_j = v_j · q_s`` and the running log-sum-exp.

    Each launch folds the logits ``z = r_j dots_j`` of its sources into ``lse`` with the online
    softmax rule, so a read over more than eight sources merges exactly across launches.
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    qs = tl.arange(0, S_PAD)
    cols = tl.arange(0, BLOCK_D)
    offs, mask = _stat_offsets(rows, qs, row_mask, S)
    for j in tl.static_range(N_SLOTS):
        v_ptr = _slot(j, v0, v1, v2, v3, v4, v5, v6, v7)
        dot = tl.zeros([BLOCK_M, S_PAD], cd)
        for d0 in range(0, d, BLOCK_D):
            v = _tile(v_ptr, rows, d0 + cols, row_mask, d, cd)  # [BM, BD]
            q = _tile(q_ptr, qs, d0 + cols, qs < S, d, cd)  # [S_PAD, BD]
            dot += tl.sum(v[:, None, :] * q[None, :, :], axis=2)  # [BM, S_PAD]
        tl.store(dots_ptr + j * M * S + offs, dot, mask=mask)
        r = tl.load(_slot(j, r0, r1, r2, r3, r4, r5, r6, r7) + rows, mask=row_mask, other=0.0)
        z = dot * r[:, None]
        if j == 0:
            run_max = z
            run_sum = tl.full([BLOCK_M, S_PAD], 1.0, cd)
        else:
            new_max = tl.maximum(run_max, z)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
            run_max = new_max
    lse = run_max + tl.log(run_sum)
    if ACCUM:  # merge with the earlier launches' sources: lse = log(e^prev + e^lse)
        prev = tl.load(lse_ptr + offs, mask=mask, other=0.0)
        top = tl.maximum(prev, lse)
        lse = top + tl.log(tl.exp(prev - top) + tl.exp(lse - top))
    tl.store(lse_ptr + offs, lse, mask=mask)


@triton.jit
def attend_output_kernel(
    v0, v1, v2, v3, v4, v5, v6, v7, r0, r1, r2, r3, r4, r5, r6, r7,
    dots_ptr, lse_ptr, out_ptr, M, d,
    N_SLOTS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    """Forward, pass 2 (grid: token blocks × channel blocks): ``o_s += Σ_j α_sj v_j``.

    ``lse`` is final here (pass 1 ran over every source), so the weights are exact and later
    launches only add their sources' terms.
    """
    cd: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    qs = tl.arange(0, S_PAD)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs, mask = _stat_offsets(rows, qs, row_mask, S)
    lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK_M, S_PAD, BLOCK_D], cd)
    for j in tl.static_range(N_SLOTS):
        r_ptr = _slot(j, r0, r1, r2, r3, r4, r5, r6, r7)
        alpha, _, _ = _alpha(dots_ptr + j * M * S, r_ptr, lse, offs, mask, rows, row_mask)
        v = _tile(_slot(j, v0, v1, v2, v3, v4, v5, v6, v7), rows, cols, row_mask, d, cd)  # [BM, BD]
        acc += alpha[:, :, None] * v[:, None, :]
    # o is [S, M, d]: element (m, s, c) of the tile lives at s·M·d + m·d + c
    o_offs = qs[None, :, None].to(tl.int64) * M * d + rows[:, None, None] * d + cols[None, None, :]
    o_mask = mask[:, :, None] & (cols < d)[None, None, :]
    if ACCUM:
        acc += tl.load(out_ptr + o_offs, mask=o_mask, other=0.0)
    tl.store(out_ptr + o_offs, acc, mask=o_mask)


@triton.jit
def attend_grad_stats_kernel(
    v0, v1, v2, v3, v4, v5, v6, v7, r0, r1, r2, r3, r4, r5, r6, r7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    dots_ptr, lse_ptr, dalpha_ptr, gbar_ptr, M, d,
    N_SLOTS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    """Backward, pass 1 (grid: token blocks): ``dalpha_j = g_s · v_j`` and ``gbar_s = Σ_j α_sj dalpha_sj``.

    ``gbar_s = g_s · o_s`` is the softmax's centring term; launches over later sources add to it.
    """
    cd: tl.constexpr = gbar_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    qs = tl.arange(0, S_PAD)
    cols = tl.arange(0, BLOCK_D)
    offs, mask = _stat_offsets(rows, qs, row_mask, S)
    lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
    gbar = tl.zeros([BLOCK_M, S_PAD], cd)
    for j in tl.static_range(N_SLOTS):
        v_ptr = _slot(j, v0, v1, v2, v3, v4, v5, v6, v7)
        dalpha = tl.zeros([BLOCK_M, S_PAD], cd)
        for d0 in range(0, d, BLOCK_D):
            v = _tile(v_ptr, rows, d0 + cols, row_mask, d, cd)  # [BM, BD]
            for s in tl.static_range(S):
                g = _tile(_slot(s, g0, g1, g2, g3, g4, g5, g6, g7), rows, d0 + cols, row_mask, d, cd)
                dalpha = tl.where(qs[None, :] == s, dalpha + tl.sum(v * g, axis=1)[:, None], dalpha)
        tl.store(dalpha_ptr + j * M * S + offs, dalpha, mask=mask)
        r_ptr = _slot(j, r0, r1, r2, r3, r4, r5, r6, r7)
        alpha, _, _ = _alpha(dots_ptr + j * M * S, r_ptr, lse, offs, mask, rows, row_mask)
        gbar += alpha * dalpha
    if ACCUM:
        gbar += tl.load(gbar_ptr + offs, mask=mask, other=0.0)
    tl.store(gbar_ptr + offs, gbar, mask=mask)


@triton.jit
def attend_grad_kernel(
    q_ptr, v0, v1, v2, v3, v4, v5, v6, v7, r0, r1, r2, r3, r4, r5, r6, r7,
    g0, g1, g2, g3, g4, g5, g6, g7, dv0, dv1, dv2, dv3, dv4, dv5, dv6, dv7,
    dr0, dr1, dr2, dr3, dr4, dr5, dr6, dr7,
    dots_ptr, lse_ptr, dalpha_ptr, gbar_ptr, glse_ptr, dq_ptr, M, d,
    N_SLOTS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    """Backward, pass 2 (grid: token blocks × channel blocks), with ``∂z = α (dalpha − gbar + ∂lse)``:

    ∂v_j = Σ_s α_sj g_s + r_j Σ_s ∂z_sj q_s,   ∂r_j = Σ_s ∂z_sj dots_sj,
    ∂q_s = Σ_tokens Σ_j ∂z_sj r_j v_j   (this token block's share, in ``dq [blocks, S, d]``)
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    qs = tl.arange(0, S_PAD)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    offs, mask = _stat_offsets(rows, qs, row_mask, S)
    lse = tl.load(lse_ptr + offs, mask=mask, other=0.0)
    centre = tl.load(glse_ptr + offs, mask=mask, other=0.0) - tl.load(gbar_ptr + offs, mask=mask, other=0.0)
    q = _tile(q_ptr, qs, cols, qs < S, d, cd)  # [S_PAD, BD]
    g = tl.zeros([BLOCK_M, S_PAD, BLOCK_D], cd)  # the S output gradients, loaded once for all sources
    for s in tl.static_range(S):
        g_s = _tile(_slot(s, g0, g1, g2, g3, g4, g5, g6, g7), rows, cols, row_mask, d, cd)
        g = tl.where(qs[None, :, None] == s, g_s[:, None, :], g)
    dq = tl.zeros([S_PAD, BLOCK_D], cd)
    # every channel block computes ∂r; the first one writes it
    dr_mask = row_mask & (tl.zeros([BLOCK_M], tl.int32) + tl.program_id(1) == 0)
    for j in tl.static_range(N_SLOTS):
        r_ptr = _slot(j, r0, r1, r2, r3, r4, r5, r6, r7)
        alpha, dot, r = _alpha(dots_ptr + j * M * S, r_ptr, lse, offs, mask, rows, row_mask)
        dz = alpha * (tl.load(dalpha_ptr + j * M * S + offs, mask=mask, other=0.0) + centre)
        coef = dz * r[:, None]  # [BM, S_PAD]
        dv = tl.sum(alpha[:, :, None] * g + coef[:, :, None] * q[None, :, :], axis=1)  # [BM, BD]
        dv_ptr = _slot(j, dv0, dv1, dv2, dv3, dv4, dv5, dv6, dv7)
        tile = rows[:, None] * d + cols[None, :]
        tl.store(dv_ptr + tile, dv.to(dv_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        v = _tile(_slot(j, v0, v1, v2, v3, v4, v5, v6, v7), rows, cols, row_mask, d, cd)
        dq += tl.sum(coef[:, :, None] * v[:, None, :], axis=0)  # [S_PAD, BD]
        dr_ptr = _slot(j, dr0, dr1, dr2, dr3, dr4, dr5, dr6, dr7)
        tl.store(dr_ptr + rows, tl.sum(dz * dot, axis=1), mask=dr_mask)
    dq_ptr += pid_m.to(tl.int64) * S * d  # this block's [S, d] share
    if ACCUM:
        dq += _tile(dq_ptr, qs, cols, qs < S, d, cd)
    tl.store(dq_ptr + qs[:, None] * d + cols[None, :], dq, mask=(qs < S)[:, None] & col_mask[None, :])


@triton.jit
def merge_kernel(
    o_ptr, lse_ptr, p_ptr, rp_ptr, q_ptr, out_ptr, h_ptr, sig_ptr, dot_ptr, M, d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SAVE_H: tl.constexpr,
):  # fmt: skip
    """Phase-2 merge (grid: token blocks): ``h = o + σ(r_p (p · q) − lse) (p − o)``.

    Writes ``h`` in the stream dtype to ``out``, and unrounded to ``h`` when ``SAVE_H`` (a
    low-precision stream, whose backward needs the fp32 ``h``), plus ``σ`` and ``p · q``.
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_M], cd)
    for d0 in range(0, d, BLOCK_D):
        p = _tile(p_ptr, rows, d0 + cols, row_mask, d, cd)
        q = tl.load(q_ptr + d0 + cols, mask=d0 + cols < d, other=0.0)
        dot += tl.sum(p * q[None, :], axis=1)
    r_p = tl.load(rp_ptr + rows, mask=row_mask, other=0.0)
    sig = 1.0 / (1.0 + tl.exp(tl.load(lse_ptr + rows, mask=row_mask, other=0.0) - dot * r_p))  # σ(x)
    for d0 in range(0, d, BLOCK_D):
        tile = rows[:, None] * d + d0 + cols[None, :]
        mask = row_mask[:, None] & (d0 + cols < d)[None, :]
        o = _tile(o_ptr, rows, d0 + cols, row_mask, d, cd)
        p = _tile(p_ptr, rows, d0 + cols, row_mask, d, cd)
        h = o + sig[:, None] * (p - o)
        tl.store(out_ptr + tile, h.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(h_ptr + tile, h, mask=mask)
    tl.store(sig_ptr + rows, sig, mask=row_mask)
    tl.store(dot_ptr + rows, dot, mask=row_mask)


@triton.jit
def merge_grad_kernel(
    g_ptr, h_ptr, p_ptr, rp_ptr, sig_ptr, dot_ptr, q_ptr, do_ptr, dp_ptr, dlse_ptr, drp_ptr, dq_ptr, M, d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge backward (grid: token blocks), with ``∂x = σ · (g · (p − h))``:

    ∂o = (1 − σ) g,   ∂p = σ g + ∂x r_p q,   ∂lse = −∂x,   ∂r_p = ∂x (p · q),
    ∂q = Σ_tokens ∂x r_p p   (this token block's share, in ``dq [blocks, d]``)
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M], cd)
    for d0 in range(0, d, BLOCK_D):
        g = _tile(g_ptr, rows, d0 + cols, row_mask, d, cd)
        p = _tile(p_ptr, rows, d0 + cols, row_mask, d, cd)
        h = _tile(h_ptr, rows, d0 + cols, row_mask, d, cd)
        acc += tl.sum(g * (p - h), axis=1)
    sig = tl.load(sig_ptr + rows, mask=row_mask, other=0.0)
    dx = sig * acc
    coef = dx * tl.load(rp_ptr + rows, mask=row_mask, other=0.0)
    tl.store(dlse_ptr + rows, -dx, mask=row_mask)
    tl.store(drp_ptr + rows, dx * tl.load(dot_ptr + rows, mask=row_mask, other=0.0), mask=row_mask)
    for d0 in range(0, d, BLOCK_D):
        tile = rows[:, None] * d + d0 + cols[None, :]
        mask = row_mask[:, None] & (d0 + cols < d)[None, :]
        g = _tile(g_ptr, rows, d0 + cols, row_mask, d, cd)
        p = _tile(p_ptr, rows, d0 + cols, row_mask, d, cd)
        q = tl.load(q_ptr + d0 + cols, mask=d0 + cols < d, other=0.0)
        d_p = sig[:, None] * g + coef[:, None] * q[None, :]
        tl.store(do_ptr + tile, (1.0 - sig)[:, None] * g, mask=mask)
        tl.store(dp_ptr + tile, d_p.to(dp_ptr.dtype.element_ty), mask=mask)
        dq = tl.sum(coef[:, None] * p, axis=0)  # this block's share of ∂q  [BD]
        tl.store(dq_ptr + pid.to(tl.int64) * d + d0 + cols, dq, mask=d0 + cols < d)


# --- no-grad reads over a stack of blocks (attnres.ops.stacked) ------------------------------------
# The stack is one tensor, values [C, M, d] and rstd [C, M, 1] (statistics dtype, contiguous), so a
# source is an offset, not a pointer argument: the source index is a grid axis (phase 1) or a loop
# bound (the output pass), a runtime value, and one launch per pass serves any n without a
# recompile. Queries are tiled by BLOCK_S (S itself is a runtime value too).


@triton.jit
def stack_logits_kernel(
    values_ptr, rstd_ptr, q_ptr, z_ptr, M, d, S,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Phase 1, pass 1 (grid: token blocks × sources × query blocks): ``z_js = r_j (v_j · q_s)``.

    One program per (token block, source, query block), so the dots of every source run in
    parallel; ``z [n, M, S]`` in the statistics dtype.
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    j = tl.program_id(1)
    qs = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    q_mask = qs < S
    cols = tl.arange(0, BLOCK_D)
    stack_rows = j * M + rows  # rows of the [C·M, d] stack (and of z [n·M, S]), int64
    dot = tl.zeros([BLOCK_M, BLOCK_S], cd)
    for d0 in range(0, d, BLOCK_D):
        v = _tile(values_ptr, stack_rows, d0 + cols, row_mask, d, cd)  # [BM, BD]
        q = _tile(q_ptr, qs, d0 + cols, q_mask, d, cd)  # [BS, BD]
        dot += tl.sum(v[:, None, :] * q[None, :, :], axis=2)  # [BM, BS]
    r = tl.load(rstd_ptr + stack_rows, mask=row_mask, other=0.0)
    offs = stack_rows[:, None] * S + qs[None, :]
    tl.store(z_ptr + offs, dot * r[:, None], mask=row_mask[:, None] & q_mask[None, :])


@triton.jit
def stack_output_kernel(
    values_ptr, z_ptr, outs_ptr, lse_ptr, n, M, d, S,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, NEED_LSE: tl.constexpr,
):  # fmt: skip
    """Phase 1, pass 2 (grid: token blocks × channel blocks × query blocks): ``o_s = Σ_j α_sj v_j``.

    Each program folds the ``n`` logits of its tokens into ``lse`` itself (``n · S`` numbers per
    token, a negligible repeat across channel blocks; the first channel block stores it when
    ``NEED_LSE``), then adds the weighted sources of its channel block. Writes ``outs [M, S, d]``.
    """
    cd: tl.constexpr = outs_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    qs = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = row_mask[:, None] & (qs < S)[None, :]  # [BM, BS]
    offs = rows[:, None] * S + qs[None, :]
    run_max = tl.full([BLOCK_M, BLOCK_S], float("-inf"), cd)
    run_sum = tl.zeros([BLOCK_M, BLOCK_S], cd)
    for j in range(n):
        z = tl.load(z_ptr + (j * M + rows)[:, None] * S + qs[None, :], mask=mask, other=0.0)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    if NEED_LSE:  # noqa: SIM102 (a compile-time test, then a runtime one: Triton keeps them apart)
        if tl.program_id(1) == 0:
            tl.store(lse_ptr + offs, lse, mask=mask)
    acc = tl.zeros([BLOCK_M, BLOCK_S, BLOCK_D], cd)
    for j in range(n):
        stack_rows = j * M + rows  # int64, as every offset below
        alpha = tl.exp(tl.load(z_ptr + stack_rows[:, None] * S + qs[None, :], mask=mask, other=0.0) - lse)
        v = _tile(values_ptr, stack_rows, cols, row_mask, d, cd)  # [BM, BD]
        acc += alpha[:, :, None] * v[:, None, :]
    # outs is [M, S, d]: element (m, s, c) lives at (m·S + s)·d + c
    o_offs = offs[:, :, None] * d + cols[None, None, :]
    tl.store(outs_ptr + o_offs, acc, mask=mask[:, :, None] & col_mask[None, None, :])


@triton.jit
def _merge_weight(dot, r_p, lse):
    """``σ(r_p (p · q) − lse)`` per token, given ``dot = p · q``."""
    return 1.0 / (1.0 + tl.exp(lse - dot * r_p))


@triton.jit
def _inv_rms(sum_sq, d, eps, cd: tl.constexpr):
    """``1 / sqrt(Σ h² / d + eps)``, the root rounded to nearest (``tl.sqrt`` is approximate in fp32)."""
    if cd == tl.float64:
        return 1.0 / tl.sqrt(sum_sq / d + eps)  # float64 has no approximate square root
    else:
        return 1.0 / tl.sqrt_rn(sum_sq / d + eps)


@triton.jit
def stack_merge_kernel(
    o_ptr, o_row, lse_ptr, lse_step, p_ptr, p_row, rp_ptr, rp_step, q_ptr, w_ptr, out_ptr, M, d, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    """Phase 2 (grid: token blocks): ``h = o + σ(r_p (p · q) − lse)(p − o)``, then, when ``NORM``,
    ``h · rsqrt(mean(h²) + eps) · w``, rounded once to the output's (the partial's) dtype.

    ``o`` and ``p`` are ``[M, d]`` with row strides ``o_row``, ``p_row`` (unit stride along ``d``),
    ``lse`` and ``r_p`` ``[M]`` with element strides; ``q [d]`` and ``w [d]`` contiguous; the output
    ``[M, d]`` contiguous. ``ONE_TILE`` (``BLOCK_D ≥ d``): each row is read once and stays in
    registers. Otherwise the row is swept in ``BLOCK_D`` tiles: ``p · q`` first, then (with the
    norm) ``Σ h²``, then ``h`` is recomputed tile by tile and stored, so nothing is rounded twice.
    """
    cd: tl.constexpr = q_ptr.dtype.element_ty
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + rows * lse_step, mask=row_mask, other=0.0)
    r_p = tl.load(rp_ptr + rows * rp_step, mask=row_mask, other=0.0)
    if ONE_TILE:
        mask = row_mask[:, None] & (cols < d)[None, :]
        p = tl.load(p_ptr + rows[:, None] * p_row + cols[None, :], mask=mask, other=0.0).to(cd)
        o = tl.load(o_ptr + rows[:, None] * o_row + cols[None, :], mask=mask, other=0.0)
        q = tl.load(q_ptr + cols, mask=cols < d, other=0.0)
        sig = _merge_weight(tl.sum(p * q[None, :], axis=1), r_p, lse)
        h = o + sig[:, None] * (p - o)
        if NORM:
            scale = _inv_rms(tl.sum(h * h, axis=1), d, eps, cd)
            w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(cd)
            h = h * scale[:, None] * w[None, :]
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], h.to(out_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_M], cd)
        for d0 in range(0, d, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols < d)[None, :]
            p = tl.load(p_ptr + rows[:, None] * p_row + d0 + cols[None, :], mask=mask, other=0.0).to(cd)
            q = tl.load(q_ptr + d0 + cols, mask=d0 + cols < d, other=0.0)
            dot += tl.sum(p * q[None, :], axis=1)
        sig = _merge_weight(dot, r_p, lse)
        scale = tl.full([BLOCK_M], 1.0, cd)
        if NORM:
            sq = tl.zeros([BLOCK_M], cd)
            for d0 in range(0, d, BLOCK_D):
                mask = row_mask[:, None] & (d0 + cols < d)[None, :]
                p = tl.load(p_ptr + rows[:, None] * p_row + d0 + cols[None, :], mask=mask, other=0.0).to(cd)
                o = tl.load(o_ptr + rows[:, None] * o_row + d0 + cols[None, :], mask=mask, other=0.0)
                h = o + sig[:, None] * (p - o)
                sq += tl.sum(h * h, axis=1)
            scale = _inv_rms(sq, d, eps, cd)
        for d0 in range(0, d, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols < d)[None, :]
            p = tl.load(p_ptr + rows[:, None] * p_row + d0 + cols[None, :], mask=mask, other=0.0).to(cd)
            o = tl.load(o_ptr + rows[:, None] * o_row + d0 + cols[None, :], mask=mask, other=0.0)
            h = o + sig[:, None] * (p - o)
            if NORM:
                w = tl.load(w_ptr + d0 + cols, mask=d0 + cols < d, other=0.0).to(cd)
                h = h * scale[:, None] * w[None, :]
            tl.store(out_ptr + rows[:, None] * d + d0 + cols[None, :], h.to(out_ty), mask=mask)
