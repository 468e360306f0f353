"""Communication of a pipeline step: the paper's formulas (SPEC §6) and the exact count for a layout.

All counts here are per token of one micro-batch, in units of ``d`` elements (one block, or the
partial sum, is ``d`` elements per token). Multiply by ``micro-batch tokens * d * bytes per element``
and by the number of micro-batches to get the bytes of a step, in each direction.

The formulas count blocks only. Every transition also carries the live partial sum, the hidden
state that any pipeline sends, which we count separately (one ``d`` per transition).
"""

from __future__ import annotations

from attnres.distributed.pipeline import PipelineLayout


def blocks_per_chunk(layout: PipelineLayout) -> float:
    """``N_p``: completed blocks at the end of the pipeline (embedding included, live partial not) per chunk.

    When every chunk holds a whole number of blocks and starts at a block boundary, transition ``j``
    carries exactly ``j * N_p`` completed blocks, the premise of Eq. 7 and 8.
    """
    return layout.blocks_out[-1] / layout.n_chunks


def eq7_naive(pp: int, vpp: int, n_p: float) -> float:
    """SPEC Eq. 7: ``Σ_{j=1}^{C-1} j·N_p = C(C-1)/2 · N_p`` blocks, with ``C = pp * vpp``."""
    C = pp * vpp
    return C * (C - 1) / 2 * n_p


def eq8_cached(pp: int, vpp: int, n_p: float) -> float:
    """SPEC Eq. 8: ``P(P-1)/2 · N_p + (V-1)·P²·N_p`` blocks."""
    return pp * (pp - 1) / 2 * n_p + (vpp - 1) * pp**2 * n_p


def expected_blocks(layout: PipelineLayout, cache: str) -> dict[int, int]:
    """Blocks sent over each transition ``j = 1 … C-1`` (the link into chunk ``j``), partial excluded.

    Transition ``j`` carries the ``blocks_out[j-1]`` completed blocks leaving chunk ``j-1`` minus
    those the receiving rank already holds from chunk ``j - P`` (:meth:`PipelineLayout.known`).
    """
    return {j: layout.sent_blocks(j, cache) for j in range(1, layout.n_chunks)}


def expected_tensors(layout: PipelineLayout, cache: str) -> dict[int, int]:
    """``[B, T, d]`` tensors per micro-batch over each transition: the blocks plus the partial/hidden."""
    return {j: n + 1 for j, n in expected_blocks(layout, cache).items()}
