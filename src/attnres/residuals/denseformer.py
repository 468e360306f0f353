"""DenseFormer (Pagliardini et al., NeurIPS 2024): depth-weighted averages (DWA) of unit outputs.

A *unit* is a Transformer layer (two sublayers, the paper's granularity) or, with
``granularity="sublayer"``, a single sublayer. ``X_0`` is the embedding, ``X_i`` the output of
unit ``i`` (its input plus its residual deltas, so the skip path is included), and::

    Y_i = Σ_{j ∈ S_i} α_{i,j} X_j   if i ≡ 0 (mod p),  else  Y_i = X_i
    S_i = { j ≤ i : j ≡ i (mod k) }                  (dilation k; X_0 only when i ≡ 0 mod k)

Unit ``i+1`` reads ``Y_i``; the final norm reads ``Y_D``. The average runs over the outputs
``X_j``, not over the averaged ``Y_j`` and not over sublayer deltas (research/baselines.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnres.residuals.base import ResidualConfig, ResidualScheme, check_at_least, check_choice
from attnres.residuals.registry import register


@dataclass
class DenseFormerOptions(ResidualConfig):
    """Options of DenseFormer.

    Attributes:
        dilation: ``k``: depth ``i`` averages only the outputs ``j ≡ i (mod k)``.
        period: ``p``: a weighted average after every ``p``-th unit only.
        granularity: ``"layer"`` (paper: one unit is a Transformer layer, two sublayers) or
            ``"sublayer"``.
    """

    variant: str = "denseformer"
    dilation: int = 1
    period: int = 1
    granularity: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "dilation")
        check_at_least(self, "period")
        check_choice(self, "granularity", ("layer", "sublayer"))


@dataclass(frozen=True)
class DenseState:
    """``outputs``: the unit outputs ``X_0 … X_i`` so far; ``h``: the running stream within a unit."""

    outputs: tuple[Tensor, ...]
    h: Tensor


@register("denseformer")
class DenseFormer(ResidualScheme):
    """DenseFormer ``k×p`` (``residual.dilation`` ×  ``residual.period``); ``1×1`` is the full one.

    Parameters:
        ``dwa[m]``: one unconstrained weight vector per DWA position ``i = (m+1)·p``, of length
        ``|S_i| = floor(i/k) + 1``, ordered by ``j``. Init: the last entry ``α_{i,i} = 1`` and
        the rest 0, so the model **equals PreNorm at init** (a test pins it).

    The official code puts these weights in AdamW's weight-decay group; whether they decay is
    the optimiser's choice, not this module's.
    """

    options = DenseFormerOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.unit = 2 if cfg.granularity == "layer" else 1
        self.n_units = n_sublayers // self.unit
        self.dilation, self.period = cfg.dilation, cfg.period
        self.dwa = nn.ParameterList(
            nn.Parameter(torch.zeros(i // self.dilation + 1))
            for i in range(self.period, self.n_units + 1, self.period)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for alpha in self.dwa:
            nn.init.zeros_(alpha)
            alpha.data[-1] = 1.0

    def average(self, outputs: tuple[Tensor, ...]) -> Tensor:
        """``Y_i`` for ``i = len(outputs) - 1``, a multiple of the period."""
        i = len(outputs) - 1
        alpha = self.dwa[i // self.period - 1]
        picked = outputs[i % self.dilation :: self.dilation]  # X_j with j ≡ i (mod k), ascending
        out = alpha[0].to(picked[0].dtype) * picked[0]
        for a, x in zip(alpha[1:], picked[1:], strict=True):
            out = out + a.to(x.dtype) * x
        return out

    def init_state(self, embedding: Tensor) -> DenseState:
        return DenseState(outputs=(embedding,), h=embedding)

    def layer_input(self, state: DenseState, layer: int) -> Tensor:
        return state.h

    def update(self, state: DenseState, layer: int, out: Tensor) -> DenseState:
        h = state.h + out
        if (layer + 1) % self.unit:
            return DenseState(outputs=state.outputs, h=h)
        outputs = (*state.outputs, h)
        if (len(outputs) - 1) % self.period == 0:
            h = self.average(outputs)
        return DenseState(outputs=outputs, h=h)

    def final(self, state: DenseState) -> Tensor:
        return state.h

    def extra_repr(self) -> str:
        return f"units={self.n_units}, dilation={self.dilation}, period={self.period}"
