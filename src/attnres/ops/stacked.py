"""Two-phase depth reads for inference: sources stacked once in a preallocated buffer, no autograd.

Under ``torch.no_grad`` nothing is saved for a backward pass, so the sources can live in one buffer
``[N_max, ..., d]`` (statistics dtype) that each source is written into exactly once, when it is
complete. A read is then a handful of whole-stack operations instead of a few per source. This
matters most when decoding, where a source is one token wide and the cost of a depth read is the
number of tensor operations, not the bytes they touch.

The math is the two-phase computation of :mod:`attnres.ops.two_phase` (SPEC §4):

* :func:`stacked_phase1`: ``S`` folded queries against the ``n`` completed blocks, returning the
  normalised outputs and, where a phase-2 merge follows, their log-sum-exp.
* :func:`stacked_merge`: ``h = o + σ(r_p (p · q) − lse) (p − o)`` with the live partial sum ``p``.

Only for inference: these functions write into their buffers in place and are not differentiable.
The residual scheme uses them when gradients are disabled; training uses :mod:`attnres.ops.fused`.

Kernels (:func:`attnres.ops.dispatch.kernels_for`, as for the training reads): on CPU the native
kernels (:mod:`attnres.ops.native`) do phase 1 in one pass over the stack per read group and the
merge in one pass per token, in eager mode (under ``torch.compile`` inductor fuses the PyTorch ops
instead); on CUDA the Triton kernels; otherwise, or with ``ATTNRES_KERNELS=torch``, the PyTorch ops
below, their reference twin.

**The read fused with its norm.** In the model every read's output is used only through the RMSNorm
that follows it (the sublayer's pre-norm, or the final norm), so :func:`stacked_merge` optionally
applies that norm in the same pass (``norm_weight``, ``norm_eps``): ``rmsnorm(h) · w`` is computed
from the fp32 ``h`` and rounded once, to the stream dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnres.ops import native
from attnres.ops import triton as triton_ops
from attnres.ops.dispatch import kernels_for
from attnres.ops.fused import rstd_stat
from attnres.ops.precision import no_autocast, stats_dtype


def _kernels(x: Tensor) -> str:
    """:func:`~attnres.ops.dispatch.kernels_for` of ``x``, except that under ``torch.compile`` the
    native kernels give way to PyTorch ops, which inductor fuses (the native no-grad kernels are
    eager-only library calls; :mod:`attnres.ops.native` says why)."""
    kernels = kernels_for(x)
    return "torch" if kernels == "native" and torch.compiler.is_compiling() else kernels


class SourceStack:
    """A preallocated stack of depth sources and their ``rsqrt(mean(v²) + eps)`` statistics.

    Args:
        like: a source ``[..., d]``; the stack takes its shape and device, and the statistics dtype
            of its dtype.
        capacity: the most sources the stack will hold.

    Tokens are flattened: ``values [capacity, M, d]`` and ``rstd [capacity, M, 1]`` with ``M`` the
    product of the leading dims of ``like``; the first :attr:`size` rows are filled.
    """

    def __init__(self, like: Tensor, capacity: int) -> None:
        dtype = stats_dtype(like.dtype)
        tokens = like.numel() // like.shape[-1]
        self.values = like.new_empty((capacity, tokens, like.shape[-1]), dtype=dtype)
        self.rstd = like.new_empty((capacity, tokens, 1), dtype=dtype)
        self.size = 0

    def push(self, v: Tensor, rstd: Tensor) -> None:
        """Append a completed source ``[..., d]`` and its statistic ``[...]``."""
        if self.size == self.values.shape[0]:
            raise RuntimeError(f"the source stack is full ({self.size} sources)")
        if _kernels(v) == "native":  # one call, not two copies
            native.stack_push(self.values, self.rstd, self.size, v, rstd)
            self.size += 1
            return
        # reshape, not view: a source may be a strided view (a sequence-first layout transposed)
        self.values[self.size].copy_(v.reshape(self.values.shape[1:]))
        self.rstd[self.size].copy_(rstd.reshape(self.rstd.shape[1:]))
        self.size += 1


@no_autocast
def stacked_phase1(stack: SourceStack, queries: Tensor, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Phase 1: ``S`` folded queries against every source in ``stack``, in one pass.

    Args:
        stack: the completed blocks, ``n = stack.size ≥ 1``.
        queries: folded queries ``w ⊙ γ`` ``[S, d]`` in the stack's dtype.
        need_lse: also return the log-sum-exp (a phase-2 merge follows).

    Returns:
        ``outs [M, S, d]`` (statistics dtype) and ``lse [M, S]`` or ``None``, tokens flattened.
    """
    n, tokens, d = stack.size, stack.values.shape[1], stack.values.shape[2]
    if n < 1:
        raise ValueError("phase 1 needs at least one completed block on the stack")
    kernels = _kernels(stack.values)
    if kernels in ("native", "triton"):
        phase1 = native.stack_phase1 if kernels == "native" else triton_ops.stack_phase1
        outs, lse = phase1(stack.values, stack.rstd, n, queries.contiguous(), need_lse)
        return outs, lse if need_lse else None
    values = stack.values[:n]  # [n, M, d], contiguous
    logits = torch.mm(values.view(n * tokens, d), queries.T).view(n, tokens, -1)  # [n, M, S]
    logits.mul_(stack.rstd[:n])
    if need_lse:
        top = logits.amax(0)  # [M, S]
        alpha = logits.sub_(top).exp_()
        total = alpha.sum(0)
        alpha.div_(total)
        lse = total.log_().add_(top)
    else:
        alpha, lse = logits.softmax(0), None
    # per token, [S, n] @ [n, d]: S weighted sums of its n sources
    outs = torch.bmm(alpha.permute(1, 2, 0), values.transpose(0, 1))  # [M, S, d]
    return outs, lse


@no_autocast
def stacked_merge(
    o: Tensor,
    lse: Tensor,
    partial: Tensor,
    partial_rstd: Tensor,
    query: Tensor,
    norm_weight: Tensor | None = None,
    norm_eps: float | None = None,
) -> Tensor:
    """Phase 2: ``h = o + σ(r_p (p · q) − lse)(p − o)``, returned as ``[..., d]`` in the partial's dtype.

    Args:
        o: the read's phase-1 output ``[M, d]`` (statistics dtype, tokens flattened; any row stride).
        lse: its log-sum-exp ``[M]``.
        partial: the live partial sum ``p`` ``[..., d]``.
        partial_rstd: ``rstd_stat(p)`` ``[...]``.
        query: the folded query ``[d]`` (statistics dtype).
        norm_weight: the gain ``[d]`` of the RMSNorm that consumes the read: the result is then
            ``rmsnorm(h, norm_eps) · norm_weight``, fused into the same pass on the native kernels.
            ``None``: ``h`` itself.
        norm_eps: that norm's epsilon (``None``: the machine epsilon of the partial's dtype, as
            ``torch.nn.RMSNorm`` takes it).
    """
    if norm_weight is not None:
        norm_weight = norm_weight.to(partial.dtype)
        norm_eps = torch.finfo(partial.dtype).eps if norm_eps is None else norm_eps
    p_rows = partial.reshape(o.shape)  # [M, d]; a view unless the partial is a strided view
    kernels = _kernels(partial)
    if kernels in ("native", "triton"):
        merge = native.stack_merge if kernels == "native" else triton_ops.stack_merge
        out = merge(o, lse, p_rows, partial_rstd.reshape(lse.shape), query, norm_weight, norm_eps or 0.0)
        return out.view(partial.shape)
    p = p_rows.to(o.dtype)
    weight = torch.mv(p, query).mul_(partial_rstd.view(lse.shape)).sub_(lse).sigmoid_()  # [M]
    h = torch.lerp(o, p, weight.unsqueeze(-1)).view(partial.shape).to(partial.dtype)
    if norm_weight is None:
        return h
    return F.rms_norm(h, (h.shape[-1],), norm_weight, norm_eps)


@no_autocast
def stacked_first_read(
    o: Tensor, like: Tensor, norm_weight: Tensor | None = None, norm_eps: float | None = None
) -> Tensor:
    """A group's first read, which sees exactly the completed blocks: its phase-1 output ``o [M, d]``
    (any row stride) as ``[..., d]`` in ``like``'s shape and dtype, or ``rmsnorm(o) · norm_weight``
    (arguments as in :func:`stacked_merge`)."""
    if norm_weight is not None:
        norm_weight = norm_weight.to(like.dtype)
        norm_eps = torch.finfo(like.dtype).eps if norm_eps is None else norm_eps
    if _kernels(like) == "native":
        return native.stack_norm(o, like, norm_weight, norm_eps or 0.0)
    h = o.reshape(like.shape).to(like.dtype)
    return h if norm_weight is None else F.rms_norm(h, (h.shape[-1],), norm_weight, norm_eps)


@no_autocast
def stacked_accumulate(partial: Tensor | None, out: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """A sublayer output entering the inference state: the partial sum ``p = partial + out`` (``out``
    when ``partial`` is ``None``, the output opening a block) and ``rstd_stat(p, eps)``.

    ``out`` is already in the stream dtype; the native kernels do both in one pass, and return a
    contiguous ``p`` (a copy of ``out`` when ``partial`` is ``None``).
    """
    if _kernels(out) == "native" and (partial is None or partial.is_contiguous()):
        return native.stack_accumulate(partial, out, eps)
    p = out if partial is None else partial + out
    return p, rstd_stat(p, eps)
