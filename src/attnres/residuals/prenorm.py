"""The standard PreNorm residual, ``h <- h + f(norm(h))``: the baseline every variant is measured against."""

from __future__ import annotations

from torch import Tensor

from attnres.residuals.base import ResidualScheme
from attnres.residuals.registry import register


@register("prenorm")
class PreNorm(ResidualScheme):
    """The state is the running sum ``h``; every sublayer reads it and adds its output."""

    def init_state(self, embedding: Tensor) -> Tensor:
        return embedding

    def layer_input(self, state: Tensor, layer: int) -> Tensor:
        return state

    def update(self, state: Tensor, layer: int, out: Tensor) -> Tensor:
        return state + out

    def final(self, state: Tensor) -> Tensor:
        return state
