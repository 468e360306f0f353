"""Sliding-window depth attention, SWA (AttnRes §5.3, Table 4: "W = 1 + 8").

Full AttnRes restricted to a window: sublayer ``l`` reads the embedding plus the outputs of the
last ``W = residual.window`` sublayers, ``{v_0} ∪ {v_i : max(1, l-W) ≤ i ≤ l-1}`` (1-based
sublayer outputs). There is no running sum: older outputs are visible only through later ones.
The final read sees the embedding and the last ``W`` outputs too, with its own query
(**inferred**: the paper specifies the final read only for Block AttnRes). Queries, key norms
and every ablation option are those of :class:`~attnres.residuals.attnres.FullAttnRes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from attnres.residuals.attnres import FullAttnRes
from attnres.residuals.registry import register


@dataclass(frozen=True)
class WindowState:
    """The embedding, and the last ``W`` sublayer outputs (oldest first)."""

    embedding: Tensor
    recent: tuple[Tensor, ...]
    #: SWA reads through the reference read: the fused and two-phase paths keep per-source
    #: statistics and group state for the block schedule, which a sliding window does not follow.
    impl: ClassVar[str] = "reference"

    @property
    def sources(self) -> list[Tensor]:
        """What a read sees: the embedding, then the window."""
        return [self.embedding, *self.recent]


@register("swa")
class SlidingWindowAttnRes(FullAttnRes):
    """SWA over the embedding plus the last ``residual.window`` sublayer outputs (default 8)."""

    def max_sources(self) -> int:
        return min(self.cfg.window, self.n_sublayers) + 1

    def init_state(self, embedding: Tensor) -> WindowState:
        return WindowState(embedding=embedding, recent=())

    def update(self, state: WindowState, layer: int, out: Tensor) -> WindowState:
        return WindowState(embedding=state.embedding, recent=(*state.recent, out)[-self.cfg.window :])

    def extra_repr(self) -> str:
        return f"window={self.cfg.window}, read_sites={self.n_sublayers + 1}, d={self.d_model}"
