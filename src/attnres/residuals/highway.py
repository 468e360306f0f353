"""Highway residual (Srivastava et al., 2015) in the Transformer form of AttnRes §2.1:
``h <- (1 - g) ⊙ h + g ⊙ f(h)``, with a dynamic element-wise gate ``g = σ(W_g u + b_g)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.residuals.base import ResidualConfig, ResidualScheme, check_eps
from attnres.residuals.registry import register


@dataclass
class HighwayOptions(ResidualConfig):
    """Options of Highway.

    Attributes:
        gate_bias: initial bias of the carry gate ``g = σ(W u + b)``; negative favours carrying
            the state (paper range -1 … -3).
        eps: epsilon of the RMSNorm of the gate's input.
    """

    variant: str = "highway"
    gate_bias: float = -2.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps(self)


@register("highway")
class Highway(ResidualScheme):
    """Highway connections, one element-wise gate per sublayer.

    Parameters:
        ``gate_weight [L, d, d]``: zero at init (our choice: the gate starts at exactly
        ``σ(b_g)`` for every token, and its gradient is still non-zero).
        ``gate_bias [L, d]``: ``residual.gate_bias`` at init (default -2, the paper suggests
        -1 … -3), so the stream starts biased towards carrying ``h``.

    The gate reads ``u = rmsnorm(h)`` without a gain: the sublayer's own pre-norm lives inside
    the sublayer, so the gate uses the same statistic with no shared gain (**our choice**; the
    sources do not fix the gate's input for Transformers).

    Depth caveat: the embedding's weight in the stream decays like ``(1 - σ(b_g))^L``; at
    ``L = 32`` that is 0.017 for ``b_g = -2`` (research/baselines.md §3). Report the bias used.
    """

    options = HighwayOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.gate_weight = nn.Parameter(torch.zeros(n_sublayers, d_model, d_model))
        self.gate_bias = nn.Parameter(torch.full((n_sublayers, d_model), cfg.gate_bias))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate_weight)
        nn.init.constant_(self.gate_bias, self.cfg.gate_bias)

    def gate(self, state: Tensor, layer: int) -> Tensor:
        """The carry gate ``g [B, T, d]`` of sublayer ``layer`` for stream ``state``."""
        u = F.rms_norm(state, (self.d_model,), eps=self.cfg.eps)
        return torch.sigmoid(F.linear(u, self.gate_weight[layer], self.gate_bias[layer]))

    def init_state(self, embedding: Tensor) -> Tensor:
        return embedding

    def layer_input(self, state: Tensor, layer: int) -> Tensor:
        return state

    def update(self, state: Tensor, layer: int, out: Tensor) -> Tensor:
        g = self.gate(state, layer)
        return state + g * (out - state)

    def final(self, state: Tensor) -> Tensor:
        return state
