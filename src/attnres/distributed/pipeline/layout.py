"""Where a pipelined model's sublayers and blocks fall on its ``C = pp * vpp`` chunks.

Chunk ``c`` owns a contiguous range of sublayers and lives on rank ``c % pp`` (loop placement). The
layout also records how many completed blocks enter and leave each chunk, which is what the
cross-stage cache and the communication accounting (``attnres.distributed.accounting``) count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnres.distributed.pipeline.state import BlockState, state_tensors
from attnres.model import Transformer
from attnres.ops.dispatch import use_impl

CACHE_MODES = ("off", "received", "seen")


def even_bounds(n_sublayers: int, n_chunks: int) -> tuple[int, ...]:
    """Sublayer boundaries ``[0, …, L]`` of ``n_chunks`` contiguous chunks; sizes differ by at most 1."""
    if n_chunks > n_sublayers:
        raise ValueError(
            f"the model has {n_sublayers} sublayers (2 per layer) but pp * vpp = {n_chunks} pipeline "
            "chunks; every chunk needs at least one sublayer: lower --parallel.pp / --parallel.vpp "
            "or raise model.n_layers"
        )
    base, extra = divmod(n_sublayers, n_chunks)
    bounds = [0]
    for c in range(n_chunks):
        bounds.append(bounds[-1] + base + (c < extra))
    return tuple(bounds)


@dataclass(frozen=True)
class PipelineLayout:
    """Where the sublayers and the blocks fall on the ``C = pp * vpp`` chunks.

    Attributes:
        pp: physical stages ``P`` (ranks).
        vpp: virtual stages ``V`` per rank.
        bounds: ``C + 1`` sublayer indices; chunk ``c`` owns sublayers ``bounds[c] … bounds[c+1]-1``.
        blocks_in: per chunk, completed blocks in the state entering it (0 for chunk 0).
        blocks_out: per chunk, completed blocks in the state leaving it.
        carries_blocks: whether the residual state has blocks (AttnRes) or is one tensor.
    """

    pp: int
    vpp: int
    bounds: tuple[int, ...]
    blocks_in: tuple[int, ...]
    blocks_out: tuple[int, ...]
    carries_blocks: bool

    @property
    def n_chunks(self) -> int:
        """``C = pp * vpp``."""
        return self.pp * self.vpp

    def rank_of(self, chunk: int) -> int:
        """Loop placement: chunk ``c`` runs on rank ``c % pp``."""
        return chunk % self.pp

    def chunks_of(self, rank: int) -> list[int]:
        """The chunks on ``rank``, in virtual-stage order."""
        return list(range(rank, self.n_chunks, self.pp))

    def known(self, chunk: int, cache: str) -> int:
        """How many leading blocks the rank of ``chunk`` already holds when the state arrives."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "off" or chunk < self.pp or not self.carries_blocks:
            return 0
        previous = chunk - self.pp  # the same rank's previous chunk for this micro-batch
        return self.blocks_in[previous] if cache == "received" else self.blocks_out[previous]

    def sent_blocks(self, chunk: int, cache: str) -> int:
        """Blocks sent over the link into ``chunk`` (besides the partial), per micro-batch and token."""
        return self.blocks_out[chunk - 1] - self.known(chunk, cache)


def make_layout(
    model: Transformer, pp: int, vpp: int = 1, bounds: Sequence[int] | None = None
) -> PipelineLayout:
    """Split ``model``'s sublayers over ``pp * vpp`` chunks (evenly unless ``bounds`` is given).

    Block counts come from running the residual scheme's own bookkeeping (``init_state`` and
    ``update``) on a one-token stand-in, so the layout follows whatever sealing rule the scheme has.
    """
    if pp < 1 or vpp < 1:
        raise ValueError(f"--parallel.pp and --parallel.vpp must be >= 1, got pp={pp}, vpp={vpp}")
    L, C = model.cfg.n_sublayers, pp * vpp
    bounds = tuple(bounds) if bounds is not None else even_bounds(L, C)
    if len(bounds) != C + 1 or bounds[0] != 0 or bounds[-1] != L:
        raise ValueError(f"bounds must be {C + 1} sublayer indices from 0 to {L}, got {bounds}")
    if any(b >= e for b, e in itertools.pairwise(bounds)):
        raise ValueError(f"every pipeline chunk needs at least one sublayer; bounds {bounds} leave one empty")
    if C > 1 and model.cfg.tie_embeddings:
        raise ValueError(
            "tied embeddings put embed and lm_head on different pipeline ranks; "
            "set model.tie_embeddings=false to use pipeline parallelism"
        )
    scheme = model.residual
    weight = model.embed.weight  # one token like the model's: some schemes' updates use their weights
    token = torch.zeros(1, 1, model.cfg.d_model, dtype=weight.dtype, device=weight.device)
    # Why use_impl: bookkeeping only, on dummy tensors. The reference read's state is the one that
    # ships (state.state_template), and it computes no statistics or phase-1 reads on the way; a
    # read strategy chosen outside the scheme (issue 14 item 2) would make this a plain argument.
    with use_impl("reference"):
        state = scheme.init_state(token)
        carries_blocks = isinstance(state, BlockState)
        counts = [len(state_tensors(state)) - 1]  # completed blocks after each sublayer boundary
        for layer in range(L):
            state = scheme.update(state, layer, token)
            counts.append(len(state_tensors(state)) - 1)
    blocks_in = tuple(0 if c == 0 else counts[bounds[c]] for c in range(C))
    blocks_out = tuple(counts[bounds[c + 1]] for c in range(C))
    return PipelineLayout(pp, vpp, bounds, blocks_in, blocks_out, carries_blocks)
