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
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnres.ops.precision import no_autocast, stats_dtype


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
def stacked_merge(o: Tensor, lse: Tensor, partial: Tensor, partial_rstd: Tensor, query: Tensor) -> Tensor:
    """Phase 2: ``h = o + σ(r_p (p · q) − lse)(p − o)``, returned as ``[..., d]`` in the partial's dtype.

    Args:
        o: the read's phase-1 output ``[M, d]`` (statistics dtype, tokens flattened).
        lse: its log-sum-exp ``[M]``.
        partial: the live partial sum ``p`` ``[..., d]``.
        partial_rstd: ``rstd_stat(p)`` ``[...]``.
        query: the folded query ``[d]`` (statistics dtype).
    """
    p = partial.reshape(o.shape).to(o.dtype)  # [M, d]
    weight = torch.mv(p, query).mul_(partial_rstd.view(lse.shape)).sub_(lse).sigmoid_()  # [M]
    return torch.lerp(o, p, weight.unsqueeze(-1)).view(partial.shape).to(partial.dtype)
