"""The generalised reference depth read: the paper's Table 4 ablations as options of one read.

Naive on purpose, like :mod:`attnres.ops.reference`, which stays the oracle of the paper's read.
With every option at its default this computes exactly ``reference.depth_read`` (a test pins it).
The options::

    k_i     = gain ⊙ v_i / rms(v_i)           (key_norm=True; raw v_i when False)
    s_i,h   = q_h · k_i,h                      (heads=H: channel group h of width d/H)
    s_i     = logits_i                         (input-independent mixing: no query, no key)
    α_i,h   = softmax_i(s_i,h) or σ(s_i,h)     (normalizer)
    out[h]  = Σ_i α_i,h v_i[h]                 (values raw, per channel group)

``query`` is ``[d]`` (a pseudo-query) or ``[..., d]`` (an input-dependent query, one per token).
Statistics run in fp32 (fp64 for fp64 sources), as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnres.ops.precision import stats_dtype

NORMALIZERS = ("softmax", "sigmoid")


def general_depth_logits(
    sources: Sequence[Tensor],
    query: Tensor,
    gain: Tensor | None,
    eps: float = 1e-6,
    heads: int = 1,
) -> Tensor:
    """Scores ``[N, ..., H]`` of one read site, in the statistics dtype (fp32; fp64 for fp64).

    Args:
        sources: ``N ≥ 1`` tensors ``[..., d]``.
        query: ``[d]`` or ``[..., d]`` broadcastable against a source.
        gain: the key RMSNorm gain ``[d]``; ``None`` scores the raw sources (no key RMSNorm).
        eps: added to ``mean(v²)`` inside the RMS.
        heads: ``H``; must divide ``d``. The key RMS is taken over all ``d`` channels (our choice:
            one key norm per read, as in single-head), the dot product per channel group.
    """
    if len(sources) == 0:
        raise ValueError("a depth read needs at least one source")
    d = sources[0].shape[-1]
    if d % heads:
        raise ValueError(f"depth-attention heads={heads} must divide the hidden width d={d}")
    sd = stats_dtype(sources[0].dtype)
    keys = torch.stack([s.to(sd) for s in sources])  # [N, ..., d]
    if gain is not None:
        keys = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + eps) * gain.to(sd)
    prod = keys * query.to(sd)  # [N, ..., d]
    return prod.unflatten(-1, (heads, d // heads)).sum(-1)  # [N, ..., H]


def general_depth_weights(logits: Tensor, normalizer: str = "softmax") -> Tensor:
    """Weights from scores ``[N, ...]``: a softmax over sources (dim 0), or a sigmoid per source."""
    if normalizer == "softmax":
        return logits.softmax(dim=0)
    if normalizer == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown normalizer {normalizer!r}; valid: {', '.join(NORMALIZERS)}")


def general_depth_mix(sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``Σ_i α_i v_i``, weights ``[N, ..., H]`` per channel group; summed in their dtype, source dtype out."""
    values = torch.stack([s.to(weights.dtype) for s in sources])  # [N, ..., d]
    heads = weights.shape[-1]
    grouped = values.unflatten(-1, (heads, values.shape[-1] // heads))  # [N, ..., H, d/H]
    out = (weights.unsqueeze(-1) * grouped).sum(0).flatten(-2)  # [..., d]
    return out.to(sources[0].dtype)


def general_depth_read(
    sources: Sequence[Tensor],
    query: Tensor | None,
    gain: Tensor | None,
    eps: float = 1e-6,
    *,
    heads: int = 1,
    normalizer: str = "softmax",
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One depth read with the ablation options; returns ``(output [..., d], weights [N, ..., H])``.

    Pass ``query`` (and ``gain``, or ``None`` for no key RMSNorm) for attention over depth, or
    ``logits [N]`` instead for input-independent mixing (then ``query`` and ``gain`` are unused).
    """
    if logits is not None:
        if logits.shape != (len(sources),):
            raise ValueError(f"mixing logits must have shape [{len(sources)}], got {tuple(logits.shape)}")
        scores = logits.to(stats_dtype(sources[0].dtype)).reshape(len(sources), *([1] * sources[0].dim()))
    elif query is not None:
        scores = general_depth_logits(sources, query, gain, eps, heads)
    else:
        raise ValueError("a depth read needs a query or mixing logits")
    weights = general_depth_weights(scores, normalizer)
    return general_depth_mix(sources, weights), weights
