"""The residual-scheme interface every variant implements (research/baselines.md §0.2).

The model's sublayer loop is the same for every variant::

    state = scheme.init_state(embedding)
    for l, f in enumerate(sublayers):
        out = f(scheme.layer_input(state, l))    # f includes its own pre-norm
        state = scheme.update(state, l, out)
    h = scheme.final(state)                      # then final norm and LM head

``update`` returns a new state and never mutates the old one, so activation recomputation can
replay a sublayer without replaying any bookkeeping twice.

**The stream dtype** is the embedding's dtype: the dtype of the state ``init_state`` builds. It is
the model's parameter dtype (fp32, or bf16 for a model cast with ``model.to(torch.bfloat16)``),
also under ``torch.autocast``, where the sublayers' outputs come back in bf16/fp16 beside an fp32
embedding. A scheme that keeps sublayer outputs as depth sources brings each one to the stream dtype
as it enters the state (:func:`to_stream`), so every source of a read shares one dtype, which is
what the fast depth reads and their native and Triton kernels take. This is the dtype PreNorm's
``h + f(h)`` already has under autocast (the sum promotes to fp32), so every variant's residual
stream is fp32 under mixed precision, the convention of autocast training. Why this rule and not
"sources in the autocast dtype": the upcast is exact (a bf16/fp16 value is an fp32 value), block
sums accumulate in fp32 as PreNorm's sum does, and the embedding is never rounded; it costs one
elementwise cast per sublayer output (none for an output added to a running sum, where the add
promotes anyway) and fp32 storage for the sources, the size of PreNorm's fp32 stream.

Activation checkpointing by blocks (``Transformer.set_activation_checkpointing("block")``) runs
``checkpoint_group()`` consecutive sublayers at a time under one checkpoint. What is kept for the
backward is the state at each group boundary, reduced by :meth:`ResidualScheme.carry`; inside the
next group :meth:`ResidualScheme.resume` rebuilds what ``carry`` dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from attnres.configs import check_numbers
from attnres.ops.dispatch import check_impl
from attnres.residuals.registry import variant_class, variant_names


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

    Depth-attention options (``block``, ``full``, ``swa``; ``hierarchical`` where noted). The
    defaults are the paper's method; the others are the ablations of paper Table 4:
        query: ``"learned"`` a pseudo-query ``w_l`` per read site (paper); ``"input"`` a ``d×d``
            projection of the newest source (input-dependent query; also ``hierarchical``);
            ``"none"`` learned scalar logits per (read site, source), no query or key
            (input-independent mixing).
        normalizer: ``"softmax"`` over sources (paper) or ``"sigmoid"`` per source.
        key_norm: RMS-normalise the keys (paper); ``False`` scores the raw sources.
        heads: depth-attention heads, ``H`` groups of channels with their own weights. ``None``
            is the variant's default: 1 for AttnRes, 4 for ``hierarchical``.
        query_init: ``"zero"`` or ``"normal"``; ``None`` is the variant's default. AttnRes
            accepts only ``"zero"`` (SPEC §2); ``hierarchical`` defaults to ``"normal"``.
        window: ``swa``: the number of most recent sublayer outputs read besides the embedding.

    Multi-stream options (``hc``, ``mhc``, ``mhc_lite``):
        n_streams: residual streams ``m`` (``mhc_lite`` allows at most 5: it mixes ``m!``
            permutations).
        dynamic: add the input-dependent part of the connection weights to the static part.
        sinkhorn_iters: ``mhc``: Sinkhorn-Knopp iterations (paper: 20).

    DenseFormer options (``denseformer``):
        dilation: ``k``: depth ``i`` averages only the outputs ``j ≡ i (mod k)``.
        period: ``p``: a weighted average after every ``p``-th unit only.
        granularity: ``"layer"`` (paper: one unit is a Transformer layer, two sublayers) or
            ``"sublayer"``.

    Highway options (``highway``):
        gate_bias: initial bias of the carry gate ``g = σ(W u + b)``; negative favours carrying
            the state (paper range -1 … -3).
    """

    variant: str = "prenorm"
    block_size: int | None = None
    eps: float = 1e-6
    query: str = "learned"
    normalizer: str = "softmax"
    key_norm: bool = True
    heads: int | None = None
    query_init: str | None = None
    window: int = 8
    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    dilation: int = 1
    period: int = 1
    granularity: str = "layer"
    gate_bias: float = -2.0
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in variant_names():
            raise ValueError(
                f"unknown residual variant {self.variant!r}; valid variants: {', '.join(variant_names())}"
            )
        check_numbers(self, "residual.")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(
                f"residual.block_size must be >= 1 sublayer (got {self.block_size}); "
                "use 1 for Full AttnRes, or None for the default of about 8 blocks"
            )
        if self.eps <= 0:
            raise ValueError(f"residual.eps must be > 0, got {self.eps}")
        check_impl(self.impl)
        for name, valid in _CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in valid:
                raise ValueError(f"residual.{name}={value!r} is not valid; valid values: {', '.join(valid)}")
        for name in ("heads", "window", "n_streams", "sinkhorn_iters", "dilation", "period"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"residual.{name} must be >= 1, got {value}")


_CHOICES: dict[str, tuple[str, ...]] = {
    "query": ("learned", "input", "none"),
    "normalizer": ("softmax", "sigmoid"),
    "query_init": ("zero", "normal"),
    "granularity": ("layer", "sublayer"),
}


def to_stream(out: Tensor, stream: Tensor) -> Tensor:
    """A sublayer output ``out`` as a depth source of the stream that ``stream`` belongs to.

    The one place the stream-dtype rule (module docstring) is applied: ``out`` in ``stream``'s
    dtype (no copy when they agree; exact under autocast, where ``out`` is bf16/fp16 and the stream
    fp32).
    """
    return out if out.dtype == stream.dtype else out.to(stream.dtype)


class ResidualScheme(nn.Module, ABC):
    """One object per model holding all per-read-site parameters of a residual variant.

    Args:
        cfg: the residual config.
        d_model: hidden width ``d``.
        n_sublayers: ``L``, the number of sublayers (two per Transformer layer).
    """

    #: whether each sublayer applies its own pre-norm (False for faithful ReZero, say)
    sublayer_norm: ClassVar[bool] = True

    #: optional observer of depth reads: schemes that attend over depth call
    #: ``recorder(site, sources, weights)`` with ``weights [N, B, T, H]``, per source and head,
    #: possibly broadcast (``[N, 1, 1, 1]`` for static mixing); site ``L`` is the final read.
    #: ``attnres.analysis`` sets it while collecting diagnostics; ``None`` otherwise, free.
    recorder: Callable[[int, Sequence[Tensor], Tensor], None] | None = None

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

    def fused_normed_input(self, state: Any, layer: int, norm: nn.Module) -> Tensor | None:
        """``norm(layer_input(state, layer))`` computed in the read's own pass, or ``None``.

        The model asks first, where nothing else needs the input before its norm, and falls back to
        ``layer_input`` and the sublayer's own norm on ``None``, the default. A scheme whose read can
        apply the norm in the same pass overrides it (AttnRes without gradients).
        """
        return None

    def normed_final(self, state: Any, norm: nn.Module) -> Tensor:
        """``norm(final(state))``, fused with the final read where :meth:`fused_normed_input` is."""
        fused = self.fused_normed_input(state, self.n_sublayers, norm)  # the final read is site L
        return norm(self.final(state)) if fused is None else fused

    def checkpoint_group(self) -> int:
        """Sublayers per segment of ``block`` activation checkpointing.

        One Transformer layer (an attention and its MLP) by default; schemes with blocks of
        sublayers override it with their block size.
        """
        return 2

    def carry(self, state: Any) -> Any:
        """``state`` reduced to what must be kept across a checkpointed group boundary.

        The default keeps the whole state. A scheme whose state holds tensors derived from others
        (and large) drops them here and rebuilds them in :meth:`resume`.
        """
        return state

    def resume(self, state: Any, site: int) -> Any:
        """A state from :meth:`carry` made ready for the read at ``site`` and the updates after it.

        ``site`` is a group start (a multiple of :meth:`checkpoint_group`) or the final read ``L``.
        The default is the identity.
        """
        return state


def build_residual(cfg: ResidualConfig, d_model: int, n_sublayers: int) -> ResidualScheme:
    """Instantiate the scheme ``cfg.variant`` for a model of width ``d_model`` and ``n_sublayers``."""
    return variant_class(cfg.variant)(cfg, d_model, n_sublayers)
