"""ReZero (Bachlechner et al., 2020): ``h <- h + α_l · f_l(h)`` with ``α_l = 0`` at init.

Faithful to the paper's Transformer: the sublayers get **no pre-norm** (``sublayer_norm = False``),
so attention and MLP read the raw stream, and every sublayer starts as the identity map.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnres.residuals.base import ResidualConfig, ResidualScheme, to_stream
from attnres.residuals.registry import register


@register("rezero")
class ReZero(ResidualScheme):
    """ReZero with one learned scalar per sublayer.

    Parameters:
        ``alpha [L]``: residual weights, **zero at init**. The official code shares one scalar
        between a layer's attention and MLP; one per sublayer is **our choice**, matching the
        paper's equation (one α per residual branch) and our sublayer-level interface.

    The model keeps its final RMSNorm before the LM head (the official package has none; an LM
    head on an unnormalised stream is fragile, so keeping it is our choice). At init the gradient
    reaches ``alpha`` but not the sublayer weights, which start moving once ``alpha != 0``.
    """

    sublayer_norm = False

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.alpha = nn.Parameter(torch.zeros(n_sublayers))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)

    def init_state(self, embedding: Tensor) -> Tensor:
        return embedding

    def layer_input(self, state: Tensor, layer: int) -> Tensor:
        return state

    def update(self, state: Tensor, layer: int, out: Tensor) -> Tensor:
        return state + self.alpha[layer].to(state.dtype) * to_stream(out, state)  # α not rounded to bf16

    def final(self, state: Tensor) -> Tensor:
        return state
