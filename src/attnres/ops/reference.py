"""The naive depth read: the oracle every fast path is tested against (SPEC §2).

Plain on purpose. It stacks the sources, normalises every key, and never caches anything.
Do not optimise this file; write a fast twin next to it instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnres.ops.precision import stats_dtype

__all__ = ["depth_read", "depth_weights", "stats_dtype"]


def depth_weights(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float = 1e-6) -> Tensor:
    """The softmax weights ``α`` of one read site, ``[N, ...]`` in :func:`stats_dtype`.

    score_i = query · (gain ⊙ v_i / rms(v_i)),   rms(x) = sqrt(mean(x²) + eps),   α = softmax_i(score)
    """
    if len(sources) == 0:
        raise ValueError("a depth read needs at least one source")
    dt = stats_dtype(sources[0].dtype)
    keys = torch.stack([s.to(dt) for s in sources])  # [N, ..., d]
    keys = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + eps) * gain.to(dt)
    return (keys * query.to(dt)).sum(-1).softmax(dim=0)


def depth_read(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float = 1e-6) -> Tensor:
    """Softmax attention over depth for one read site: ``h = Σ_i α_i v_i``.

    Args:
        sources: ``N ≥ 1`` tensors ``[..., d]`` of one dtype and shape (the embedding, block sums
            or sublayer outputs). Values enter the sum raw; only the keys are normalised.
        query: the read site's pseudo-query ``w_l``, ``[d]``.
        gain: the key RMSNorm gain ``γ_l``, ``[d]``.
        eps: added to ``mean(v²)`` inside the RMS.

    Returns:
        ``[..., d]`` in the sources' dtype. Statistics and the sum run in fp32 (fp64 for fp64
        inputs), because in low precision the query gradient suffers heavy cancellation (SPEC §2).
    """
    weights = depth_weights(sources, query, gain, eps)  # [N, ...]
    values = torch.stack([s.to(weights.dtype) for s in sources])  # [N, ..., d]
    return (weights.unsqueeze(-1) * values).sum(0).to(sources[0].dtype)
