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

import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from attnres.configs import ConfigError, check_numbers
from attnres.ops.dispatch import check_impl
from attnres.residuals.registry import options_class, variant_class, variant_names, variants_with_option


@dataclass
class ResidualConfig:
    """Which residual variant the model uses, and that variant's options.

    Every variant declares its options in its own file, as a dataclass subclass of this one (for
    example :class:`~attnres.residuals.attnres.BlockOptions`), and names it in its scheme class's
    ``options``. ``ResidualConfig(variant="block", block_size=4)`` builds the variant's class, so a
    config holds exactly the options its variant reads; any other key is an error that lists the
    valid ones. A variant without options (``prenorm``, ``rezero``) uses this class itself.

    ``dataclasses.asdict`` of a config is flat: ``{"variant": "block", "impl": "auto",
    "block_size": 4, "eps": 1e-06, ...}``, and the command line sets the same keys
    (``--model.residual.block_size=4``). A dict written before the options were per variant (every
    variant's options in one flat dict) still loads: see :meth:`resolve_config`.

    Attributes:
        variant: a registered name (``attnres.residuals.variant_names()``).
        impl: depth-read implementation for AttnRes variants: ``auto`` (the fastest correct one),
            ``reference``, ``fused`` or ``two_phase`` (see ``attnres.ops.dispatch``). Variants
            without depth reads by attention ignore it.
    """

    variant: str = "prenorm"
    impl: str = "auto"

    def __new__(cls, *args: Any, **kwargs: Any) -> ResidualConfig:
        if not args and "variant" not in kwargs:  # copy and pickle, or an options class's own default
            return super().__new__(cls)
        if len(args) > 1:
            raise TypeError(
                f"ResidualConfig takes the variant positionally and its options by name, e.g. "
                f"ResidualConfig({args[0]!r}, block_size=4); got {len(args)} positional arguments"
            )
        variant = args[0] if args else kwargs["variant"]
        target = options_class(variant)
        if not issubclass(target, cls):
            raise ConfigError(
                f"residual variant {variant!r} takes {target.__name__}, not {cls.__name__}: build its config "
                f"as ResidualConfig(variant={variant!r}, ...), or switch variants with for_variant()"
            )
        names = {f.name for f in dataclasses.fields(target)}
        extra = [k for k in kwargs if k not in names]
        if extra:
            raise ConfigError(not_an_option(variant, extra, "residual."))
        return super().__new__(target)

    def __post_init__(self) -> None:
        target = options_class(self.variant)
        if type(self) is not target:  # dataclasses.replace(cfg, variant=...) lands here
            raise ConfigError(
                f"residual variant {self.variant!r} takes {target.__name__}, not {type(self).__name__}; "
                "switch variants with ResidualConfig.for_variant()"
            )
        check_numbers(self, "residual.")
        check_impl(self.impl)

    @classmethod
    def for_variant(cls, variant: str, *, impl: str = "auto", **options: Any) -> ResidualConfig:
        """The config of ``variant`` with those of ``options`` it has; the others are dropped.

        For code that sets options across variants (``compare`` runs one base config over every
        variant, the pipeline check its ``block_size``): an option that ``variant`` does not read
        is left out rather than refused. Build a single variant's config with ``ResidualConfig``.
        """
        names = {f.name for f in dataclasses.fields(options_class(variant))}
        return ResidualConfig(variant=variant, impl=impl, **{k: v for k, v in options.items() if k in names})

    def with_variant(self, variant: str) -> ResidualConfig:
        """This config for ``variant``: ``impl`` and the options the two variants share are kept."""
        options = {k: v for k, v in dataclasses.asdict(self).items() if k != "variant"}
        return ResidualConfig.for_variant(variant, **options)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ResidualConfig:
        """The config a dict describes (``dataclasses.asdict`` of one, or a dict in the flat layout of
        before options were per variant: see :meth:`resolve_config`); values are not converted."""
        target, kept = cls.resolve_config(data, {}, "residual.")
        return target(**kept)

    @classmethod
    def resolve_config(
        cls, data: Mapping[str, Any], base: Mapping[str, Any], prefix: str
    ) -> tuple[type[ResidualConfig], dict[str, Any]]:
        """The options class of the variant ``data`` (else ``base``) names, and the keys to build it from.

        The hook of :func:`attnres.configs.from_dict`: ``data`` is a (partial) dict of this section,
        ``base`` the values of the config it is laid over (their keys the variant lacks are dropped).

        **Migration of the flat layout** (before options were per variant, a config held every
        variant's options in one flat dict): a key of :data:`FLAT_DEFAULTS` that the variant does
        not have is dropped when its value is the old default, or whatever its value when ``data``
        holds every key of the flat layout (a ``config.json`` written by that code: the old code
        never read those keys for this variant, so the model is the same). Any other key the variant
        does not have is an error naming its valid keys.
        """
        default = cls.__dataclass_fields__["variant"].default
        variant = data.get("variant", base.get("variant", default))
        try:
            target = options_class(variant)
        except ConfigError as e:
            raise ConfigError(f"{prefix}variant: {e}") from None
        names = {f.name for f in dataclasses.fields(target)}
        flat_dump = FLAT_DEFAULTS.keys() <= data.keys()
        out = {
            k: v
            for k, v in data.items()
            if k in names or k not in FLAT_DEFAULTS or not (flat_dump or _same(v, FLAT_DEFAULTS[k]))
        }
        extra = [k for k in out if k not in names]
        if extra:
            message = not_an_option(variant, extra, prefix)
            if len(extra) > 1 and all(k in FLAT_DEFAULTS for k in extra):  # several variants' options
                message += (
                    ". (A config written before each variant had its own options held every variant's "
                    f"options; remove those {variant} does not read.)"
                )
            raise ConfigError(message)
        return target, out


#: the options of the flat ``ResidualConfig`` (one class for every variant, before each declared its
#: own) with their defaults; :meth:`ResidualConfig.resolve_config` migrates dicts in that layout
FLAT_DEFAULTS: dict[str, Any] = {
    "block_size": None,
    "eps": 1e-6,
    "query": "learned",
    "normalizer": "softmax",
    "key_norm": True,
    "heads": None,
    "query_init": None,
    "window": 8,
    "n_streams": 4,
    "dynamic": True,
    "sinkhorn_iters": 20,
    "dilation": 1,
    "period": 1,
    "granularity": "layer",
    "gate_bias": -2.0,
}


def _same(value: Any, default: Any) -> bool:
    return value is default if default is None or isinstance(default, bool) else value == default


def not_an_option(variant: str, keys: list[str], prefix: str) -> str:
    """The error for ``keys`` that residual ``variant`` has no option of: the variants that have the
    key (or, for a key no variant has, the nearest spelling), then ``variant``'s valid keys."""
    valid = [f.name for f in dataclasses.fields(options_class(variant))]
    everyone = sorted({f.name for v in variant_names() for f in dataclasses.fields(options_class(v))})
    parts = []
    for key in keys:
        others = variants_with_option(key)
        if others:
            parts.append(
                f"residual variant {variant!r} has no option {prefix}{key} (an option of {', '.join(others)})"
            )
            continue
        text = f"unknown config key {prefix + key!r}"
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        near = near or difflib.get_close_matches(key, everyone, n=1, cutoff=0.6)
        if near:
            where = "" if near[0] in valid else f" (an option of {', '.join(variants_with_option(near[0]))})"
            text += f"; did you mean {prefix}{near[0]}{where}?"
        parts.append(text)
    return "; ".join(parts) + f". Valid keys for residual variant {variant!r}: {', '.join(valid)}"


def check_choice(cfg: ResidualConfig, name: str, valid: tuple[str, ...]) -> None:
    """Raise unless ``cfg.<name>`` is one of ``valid`` (or ``None``, for an optional field)."""
    value = getattr(cfg, name)
    if value is not None and value not in valid:
        raise ValueError(f"residual.{name}={value!r} is not valid; valid values: {', '.join(valid)}")


def check_at_least(cfg: ResidualConfig, name: str, minimum: int = 1) -> None:
    """Raise unless ``cfg.<name>`` is ``>= minimum`` (or ``None``, for an optional field)."""
    value = getattr(cfg, name)
    if value is not None and value < minimum:
        raise ValueError(f"residual.{name} must be >= {minimum}, got {value}")


def check_eps(cfg: ResidualConfig) -> None:
    """Raise unless ``cfg.eps > 0``."""
    if cfg.eps <= 0:
        raise ValueError(f"residual.eps must be > 0, got {cfg.eps}")


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

    #: the variant's options dataclass (``ResidualConfig`` for a variant without options)
    options: ClassVar[type[ResidualConfig]] = ResidualConfig

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
