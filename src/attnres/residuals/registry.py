"""Name -> residual scheme class. Adding a variant is one new file in ``residuals/``.

Every module in this package is imported on first lookup, and each registers its classes with
:func:`register`, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnres.residuals.base import ResidualConfig, ResidualScheme

_REGISTRY: dict[str, type[ResidualScheme]] = {}
_loaded = False


def register(name: str) -> Callable[[type[ResidualScheme]], type[ResidualScheme]]:
    """Class decorator: make a scheme selectable as ``residual.variant=name``."""

    def deco(cls: type[ResidualScheme]) -> type[ResidualScheme]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"residual variant {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.variant_name = name
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import attnres.residuals as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _loaded = True


def variant_names() -> list[str]:
    """All registered variant names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def build_residual(cfg: ResidualConfig, d_model: int, n_sublayers: int) -> ResidualScheme:
    """Instantiate the scheme ``cfg.variant`` for a model of width ``d_model`` and ``n_sublayers``."""
    _load_all()
    try:
        cls = _REGISTRY[cfg.variant]
    except KeyError:
        raise ValueError(
            f"unknown residual variant {cfg.variant!r}; valid variants: {', '.join(variant_names())}"
        ) from None
    return cls(cfg, d_model, n_sublayers)
