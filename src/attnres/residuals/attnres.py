"""Full and Block Attention Residuals: softmax attention over depth (SPEC §2–3).

One schedule covers both, parameterised by the block size ``S`` in sublayers (``S = 1`` is Full)::

    blocks, partial = [], embedding
    for l in range(L):
        h = read_l(blocks + [partial])          # identity while only the embedding exists
        if l % S == 0:                          # boundary: seal the running sum
            blocks.append(partial); partial = None
        partial = f_l(h) if partial is None else partial + f_l(h)
    h_final = read_L(blocks + [partial])

Here the sealing happens in :meth:`update`, which is equivalent: the read of sublayer ``l`` happens
before it either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnres.ops import depth_read
from attnres.residuals.base import ResidualConfig, ResidualScheme
from attnres.residuals.registry import register


@dataclass(frozen=True)
class DepthState:
    """Sources carried across depth.

    Attributes:
        blocks: completed block representations ``b_0 … b_g``; ``b_0`` is the embedding.
        partial: the live intra-block running sum (the embedding before sublayer 0).
    """

    blocks: tuple[Tensor, ...]
    partial: Tensor

    @property
    def sources(self) -> list[Tensor]:
        """What a read sees now: the completed blocks, then the partial sum."""
        return [*self.blocks, self.partial]


def default_block_size(n_sublayers: int) -> int:
    """The paper's default of about 8 blocks: ``S = ceil(L / 8)``."""
    return max(1, math.ceil(n_sublayers / 8))


@register("block")
class BlockAttnRes(ResidualScheme):
    """Block AttnRes: sublayer outputs are summed within blocks of ``S`` sublayers.

    Parameters (one row per read site: ``L`` sublayer inputs, then the final read):
        ``query [L+1, d]``: pseudo-queries ``w_l``, **zero at init**, so the first forward is a
        uniform average of the sources (the paper calls this essential for stable training).
        ``key_gain [L+1, d]``: key RMSNorm gains ``γ_l``, one at init.
    """

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.block_size = self._block_size(cfg, n_sublayers)
        self.query = nn.Parameter(torch.zeros(n_sublayers + 1, d_model))
        self.key_gain = nn.Parameter(torch.ones(n_sublayers + 1, d_model))

    @staticmethod
    def _block_size(cfg: ResidualConfig, n_sublayers: int) -> int:
        return cfg.block_size if cfg.block_size is not None else default_block_size(n_sublayers)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.query)
        nn.init.ones_(self.key_gain)

    def read(self, sources: list[Tensor], site: int) -> Tensor:
        """Depth read at ``site`` (``0 … L-1`` sublayer inputs, ``L`` the final read)."""
        return depth_read(sources, self.query[site], self.key_gain[site], self.cfg.eps)

    def init_state(self, embedding: Tensor) -> DepthState:
        return DepthState(blocks=(), partial=embedding)

    def layer_input(self, state: DepthState, layer: int) -> Tensor:
        return self.read(state.sources, layer)

    def update(self, state: DepthState, layer: int, out: Tensor) -> DepthState:
        if layer % self.block_size == 0:
            return DepthState(blocks=(*state.blocks, state.partial), partial=out)
        return DepthState(blocks=state.blocks, partial=state.partial + out)

    def final(self, state: DepthState) -> Tensor:
        return self.read(state.sources, self.n_sublayers)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, read_sites={self.n_sublayers + 1}, d={self.d_model}"


@register("full")
class FullAttnRes(BlockAttnRes):
    """Full AttnRes: every sublayer output is its own source (``S = 1``; paper Eq. 2–4)."""

    @staticmethod
    def _block_size(cfg: ResidualConfig, n_sublayers: int) -> int:
        return 1
