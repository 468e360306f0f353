"""AttnRes for your own model: replace ``x = x + f(norm(x))`` and keep everything else.

A thin facade over the residual schemes (``attnres.residuals``), which already share the interface
``init_state / layer_input / update / final``. The facade counts the sublayers for you::

    self.res = AttnResidual(d_model, n_sublayers=2 * n_layers, variant="block")   # in __init__

    s = self.res.start(self.embed(tokens))       # was: x = self.embed(tokens)
    for blk in self.blocks:
        s.add(blk.attn(blk.norm1(s.x)))          # was: x = x + blk.attn(blk.norm1(x))
        s.add(blk.mlp(blk.norm2(s.x)))           # was: x = x + blk.mlp(blk.norm2(x))
    x = s.output()                               # then your final norm and head, unchanged

or, with a list of sublayers ``f(h)`` that each apply their own norm: ``x = self.res(x, sublayers)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from attnres.configs import check_int
from attnres.residuals import ResidualConfig, ResidualScheme, build_residual


class ResidualStream:
    """One forward pass through the residual stream of an :class:`AttnResidual`.

    Created by :meth:`AttnResidual.start`; lives for one forward pass and holds no parameters.
    """

    def __init__(self, scheme: ResidualScheme, embedding: Tensor) -> None:
        self._scheme = scheme
        self._state: Any = scheme.init_state(embedding)
        self._layer = 0
        self._input: Tensor | None = None

    @property
    def x(self) -> Tensor:
        """The input ``[B, T, d]`` of the next sublayer (for AttnRes: that sublayer's depth read)."""
        self._check_open("read x")
        if self._input is None:
            self._input = self._scheme.layer_input(self._state, self._layer)
        return self._input

    def add(self, out: Tensor) -> None:
        """Record the next sublayer's output ``[B, T, d]`` (the delta ``f(norm(x))``, not ``x + …``)."""
        self._check_open("add an output")
        self._state = self._scheme.update(self._state, self._layer, out)
        self._layer += 1
        self._input = None

    def output(self) -> Tensor:
        """The ``[B, T, d]`` tensor for the final norm, after all ``n_sublayers`` outputs were added."""
        n = self._scheme.n_sublayers
        if self._layer != n:
            raise RuntimeError(
                f"output() after {self._layer} sublayer outputs, but this AttnResidual was built for "
                f"n_sublayers={n}; call add() once per attention and once per MLP (or build it with "
                f"n_sublayers={self._layer})"
            )
        return self._scheme.final(self._state)

    def _check_open(self, what: str) -> None:
        n = self._scheme.n_sublayers
        if self._layer >= n:
            raise RuntimeError(
                f"cannot {what}: all n_sublayers={n} outputs were already added; "
                "count attention and MLP as one sublayer each (n_sublayers = 2 * n_layers)"
            )


class AttnResidual(nn.Module):
    """The residual connections of a whole model, as one module.

    Args:
        d_model: hidden width ``d``.
        n_sublayers: how many ``x = x + f(norm(x))`` lines run per forward (two per Transformer
            layer: attention and MLP).
        variant: any name in ``attnres.residuals.variant_names()``: ``"block"`` (Block AttnRes),
            ``"full"`` (Full AttnRes), ``"prenorm"`` (the standard residual, to compare against) …
        block_size: Block AttnRes block size in sublayers (``None``: about 8 blocks); ignored by a
            variant without blocks.
        eps: epsilon of the key RMSNorm in depth reads; ignored by a variant without it.
        options: any other option of the variant (its ``ResidualConfig`` fields, e.g.
            ``n_streams=2`` for ``hc``); an option the variant lacks is an error.

    Block/Full AttnRes add ``2 * d_model`` parameters per read site (``n_sublayers + 1`` sites): the
    pseudo-queries, which must start at **zero**, and key-norm gains at one. If your model runs its
    own init over every parameter, call :meth:`reset_parameters` afterwards.
    """

    def __init__(
        self,
        d_model: int,
        n_sublayers: int,
        variant: str = "block",
        block_size: int | None = None,
        eps: float = 1e-6,
        **options: Any,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, minimum=1)
        check_int("n_sublayers", n_sublayers, minimum=1)
        # block_size and eps are checked (by name, finite) by ResidualConfig
        cfg = ResidualConfig.for_variant(variant, block_size=block_size, eps=eps)
        if options:
            cfg = dataclasses.replace(cfg, **options)
        self.scheme = build_residual(cfg, d_model, n_sublayers)

    @property
    def sublayer_norm(self) -> bool:
        """Whether sublayers should keep their own pre-norm (False for e.g. faithful ReZero)."""
        return type(self.scheme).sublayer_norm

    def reset_parameters(self) -> None:
        """Re-apply the variant's init (zero pseudo-queries for AttnRes)."""
        self.scheme.reset_parameters()

    def start(self, embedding: Tensor) -> ResidualStream:
        """Begin a forward pass from the token embedding ``[B, T, d]``."""
        return ResidualStream(self.scheme, embedding)

    def forward(self, embedding: Tensor, sublayers: Iterable[Callable[[Tensor], Tensor]]) -> Tensor:
        """Run ``sublayers`` (each ``f(h)`` applies its own norm) and return the final-norm input."""
        stream = self.start(embedding)
        for f in sublayers:
            stream.add(f(stream.x))
        return stream.output()
