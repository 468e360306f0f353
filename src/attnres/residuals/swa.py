"""Sliding-window depth attention, SWA (AttnRes §5.3, Table 4: "W = 1 + 8").

Full AttnRes restricted to a window: sublayer ``l`` reads the embedding plus the outputs of the
last ``W = residual.window`` sublayers, ``{v_0} ∪ {v_i : max(1, l-W) ≤ i ≤ l-1}`` (1-based
sublayer outputs). There is no running sum: older outputs are visible only through later ones.
The final read sees the embedding and the last ``W`` outputs too, with its own query
(**inferred**: the paper specifies the final read only for Block AttnRes). Queries, key norms
and every ablation option are those of :class:`~attnres.residuals.attnres.FullAttnRes`.

Reads run on the fused path when the configuration allows (as for Full AttnRes), with each
source's RMS statistic kept beside it in the window; a window has no groups of reads that share
their sources, so ``two_phase`` reads fused too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attnres.ops.dispatch import select_impl
from attnres.ops.fused import source_rstd
from attnres.residuals.attnres import DepthReadOptions, FullAttnRes
from attnres.residuals.base import check_at_least, to_stream
from attnres.residuals.registry import register


@dataclass
class SWAOptions(DepthReadOptions):
    """Options of SWA: those of Full AttnRes (:class:`DepthReadOptions`), and the window.

    Attributes:
        window: the number of most recent sublayer outputs read besides the embedding.
    """

    variant: str = "swa"
    window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "window")


@dataclass(frozen=True)
class WindowState:
    """The embedding, and the last ``W`` sublayer outputs (oldest first).

    Attributes:
        impl: ``reference`` or ``fused``.
        rstd: ``fused`` only: ``source_rstd`` of each of :attr:`sources`.
    """

    embedding: Tensor
    recent: tuple[Tensor, ...]
    impl: str = "reference"
    rstd: tuple[Tensor, ...] = ()

    @property
    def sources(self) -> list[Tensor]:
        """What a read sees: the embedding, then the window."""
        return [self.embedding, *self.recent]


@register("swa")
class SlidingWindowAttnRes(FullAttnRes):
    """SWA over the embedding plus the last ``residual.window`` sublayer outputs (default 8)."""

    options = SWAOptions

    def max_sources(self) -> int:
        return min(self.cfg.window, self.n_sublayers) + 1

    def init_state(self, embedding: Tensor) -> WindowState:
        if select_impl(self.cfg.impl, self.fast_reads_supported()) == "reference":
            return WindowState(embedding=embedding, recent=())
        return WindowState(embedding, (), "fused", (source_rstd(embedding, self.cfg.eps),))

    def update(self, state: WindowState, layer: int, out: Tensor) -> WindowState:
        out = to_stream(out, state.embedding)
        recent = (*state.recent, out)[-self.cfg.window :]
        if state.impl == "reference":
            return WindowState(embedding=state.embedding, recent=recent)
        window_rstd = (*state.rstd[1:], source_rstd(out, self.cfg.eps))[-self.cfg.window :]
        return WindowState(state.embedding, recent, "fused", (state.rstd[0], *window_rstd))

    def extra_repr(self) -> str:
        return f"window={self.cfg.window}, read_sites={self.n_sublayers + 1}, d={self.d_model}"
