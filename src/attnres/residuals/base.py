"""The residual-scheme interface every variant implements (research/baselines.md §0.2).

The model's sublayer loop is the same for every variant::

    state = scheme.init_state(embedding)
    for l, f in enumerate(sublayers):
        out = f(scheme.layer_input(state, l))    # f includes its own pre-norm
        state = scheme.update(state, l, out)
    h = scheme.final(state)                      # then final norm and LM head

``update`` returns a new state and never mutates the old one, so activation recomputation can
replay a sublayer without replaying any bookkeeping twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from attnres.ops.dispatch import check_impl


@dataclass
class ResidualConfig:
    """Which residual variant the model uses, and its options.

    Attributes:
        variant: a registered name (``attnres.residuals.variant_names()``).
        block_size: AttnRes block size ``S`` in *sublayers* (attention and MLP count one each).
            ``None`` picks the paper's default of about 8 blocks, ``S = ceil(L / 8)``. Ignored by
            variants without blocks; ``full`` forces ``S = 1``.
        eps: epsilon of the key RMSNorm in depth reads.
        impl: depth-read implementation for AttnRes variants: ``auto`` (the fastest correct one),
            ``reference``, ``fused`` or ``two_phase`` (see ``attnres.ops.dispatch``).
    """

    variant: str = "prenorm"
    block_size: int | None = None
    eps: float = 1e-6
    impl: str = "auto"

    def __post_init__(self) -> None:
        from attnres.residuals.registry import variant_names

        if self.variant not in variant_names():
            raise ValueError(
                f"unknown residual variant {self.variant!r}; valid variants: {', '.join(variant_names())}"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(
                f"residual.block_size must be >= 1 sublayer (got {self.block_size}); "
                "use 1 for Full AttnRes, or None for the default of about 8 blocks"
            )
        if self.eps <= 0:
            raise ValueError(f"residual.eps must be > 0, got {self.eps}")
        check_impl(self.impl)


class ResidualScheme(nn.Module, ABC):
    """One object per model holding all per-read-site parameters of a residual variant.

    Args:
        cfg: the residual config.
        d_model: hidden width ``d``.
        n_sublayers: ``L``, the number of sublayers (two per Transformer layer).
    """

    #: whether each sublayer applies its own pre-norm (False for faithful ReZero, say)
    sublayer_norm: ClassVar[bool] = True

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.n_sublayers = n_sublayers

    def reset_parameters(self) -> None:  # noqa: B027 - variants without parameters need nothing
        """Initialise this scheme's parameters (called from the model's ``init_weights``)."""

    @abstractmethod
    def init_state(self, embedding: Tensor) -> Any:
        """The state before sublayer 0, from the token embedding ``[B, T, d]``."""

    @abstractmethod
    def layer_input(self, state: Any, layer: int) -> Tensor:
        """The ``[B, T, d]`` input of sublayer ``layer``."""

    @abstractmethod
    def update(self, state: Any, layer: int, out: Tensor) -> Any:
        """The state after sublayer ``layer`` produced ``out`` ``[B, T, d]``; never mutates ``state``."""

    @abstractmethod
    def final(self, state: Any) -> Tensor:
        """The ``[B, T, d]`` tensor fed to the final norm and LM head."""
