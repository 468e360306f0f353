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

Reads run through one of the implementations in :mod:`attnres.ops.dispatch`, chosen once per
forward in :meth:`BlockAttnRes.init_state` and carried in the state. The fast paths keep each
source's RMS statistic in the state (computed once, when the source is created), and ``two_phase``
groups read sites ``gS … gS+S-1`` (the last group also holds the final read ``L``): they all see
the completed blocks ``b_0 … b_g``, so phase 1 runs for the whole group as soon as ``b_g`` is
complete, in the :meth:`~BlockAttnRes.update` before site ``gS``. Every method returns a new
state and never mutates one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from attnres.ops import depth_read
from attnres.ops.dispatch import select_impl
from attnres.ops.fused import fused_depth_read, source_rstd
from attnres.ops.two_phase import phase1, phase2_merge
from attnres.residuals.base import ResidualConfig, ResidualScheme
from attnres.residuals.registry import register


@dataclass(frozen=True)
class DepthState:
    """Sources carried across depth.

    Attributes:
        blocks: completed block representations ``b_0 … b_g``; ``b_0`` is the embedding.
        partial: the live intra-block running sum (the embedding before sublayer 0).
        impl: the depth-read implementation of this forward (``reference``, ``fused``, ``two_phase``).
        rstd: fast paths only: ``source_rstd`` of each of :attr:`sources`, ``[B, T]`` each.
        group_start: ``two_phase`` only: the first read site of the current group.
        group: ``two_phase`` only: that group's phase-1 ``(outs, lse)``, one entry per site.
    """

    blocks: tuple[Tensor, ...]
    partial: Tensor
    impl: str = "reference"
    rstd: tuple[Tensor, ...] = ()
    group_start: int = 0
    group: tuple[tuple[Tensor, ...], Tensor] | None = None

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
        """Reference depth read at ``site`` (``0 … L-1`` sublayer inputs, ``L`` the final read)."""
        return depth_read(sources, self.query[site], self.key_gain[site], self.cfg.eps)

    def fast_reads_supported(self) -> bool:
        """Whether the fused and two-phase paths implement this configuration.

        They implement the paper's default read (softmax over sources, RMS-normalised keys with a
        gain, one static query per site). A configuration they do not implement must return
        ``False`` here; ``select_impl`` then falls back to the reference read.
        """
        return True

    def init_state(self, embedding: Tensor) -> DepthState:
        impl = select_impl(self.cfg.impl, self.fast_reads_supported())
        state = DepthState(blocks=(), partial=embedding, impl=impl)
        if impl == "reference":
            return state
        state = replace(state, rstd=(source_rstd(embedding, self.cfg.eps),))
        return self._open_group(state, 0) if impl == "two_phase" else state

    def layer_input(self, state: DepthState, layer: int) -> Tensor:
        return self._read(state, layer)

    def update(self, state: DepthState, layer: int, out: Tensor) -> DepthState:
        sealed = layer % self.block_size == 0
        blocks = (*state.blocks, state.partial) if sealed else state.blocks
        partial = out if sealed else state.partial + out
        if state.impl == "reference":
            return DepthState(blocks=blocks, partial=partial)
        kept = state.rstd if sealed else state.rstd[:-1]  # a sealed partial keeps its statistic
        new = replace(state, blocks=blocks, partial=partial, rstd=(*kept, source_rstd(partial, self.cfg.eps)))
        if state.impl == "two_phase" and (layer + 1) % self.block_size == 0:
            return self._open_group(new, layer + 1)
        return new

    def final(self, state: DepthState) -> Tensor:
        return self._read(state, self.n_sublayers)

    def _read(self, state: DepthState, site: int) -> Tensor:
        if state.impl == "reference":
            return self.read(state.sources, site)
        if state.impl == "fused":
            return fused_depth_read(
                state.sources, self.query[site], self.key_gain[site], self.cfg.eps, rstd=state.rstd
            )
        outs, lse = state.group
        i = site - state.group_start
        if not 0 <= i < len(outs):
            raise RuntimeError(
                f"read site {site} is outside the two-phase group starting at {state.group_start}; "
                "the state was not produced by update() for the previous sublayer"
            )
        if i == 0:  # the group's first read sees exactly the completed blocks
            return outs[0].to(state.partial.dtype)
        return phase2_merge(
            outs[i], lse[..., i], state.partial, state.rstd[-1], self.query[site], self.key_gain[site]
        )

    def _open_group(self, state: DepthState, start: int) -> DepthState:
        """Phase 1 for sites ``start …`` of one group, against ``sources`` (all complete blocks here)."""
        end = min(start + self.block_size, self.n_sublayers + 1)
        group = phase1(state.sources, state.rstd, self.query[start:end], self.key_gain[start:end])
        return replace(state, group_start=start, group=group)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, read_sites={self.n_sublayers + 1}, d={self.d_model}"


@register("full")
class FullAttnRes(BlockAttnRes):
    """Full AttnRes: every sublayer output is its own source (``S = 1``; paper Eq. 2–4)."""

    @staticmethod
    def _block_size(cfg: ResidualConfig, n_sublayers: int) -> int:
        return 1
