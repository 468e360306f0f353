"""Name -> residual scheme class. Adding a variant is one new file in ``residuals/``.

Every module in this package is imported on first lookup, and each registers its classes with
:func:`register`, so nothing else needs editing. A scheme class names its options dataclass in its
``options`` attribute (:class:`attnres.residuals.base.ResidualConfig` itself for a variant without
options); ``ResidualConfig(variant=name, ...)`` builds that class.

This module is the bottom of ``attnres.residuals``: it imports nothing from the package, so the
interface (:mod:`attnres.residuals.base`) and every variant can import it at module level.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from attnres.configs import ConfigError

Scheme = TypeVar("Scheme", bound=type)

_REGISTRY: dict[str, type] = {}
_loaded = False


def register(name: str) -> Callable[[Scheme], Scheme]:
    """Class decorator: make a scheme (a ``ResidualScheme`` subclass) selectable as
    ``residual.variant=name``. Its ``options`` attribute (a ``ResidualConfig`` dataclass) is the
    config it takes."""

    def deco(cls: Scheme) -> Scheme:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"residual variant {name!r} is registered twice")
        if not dataclasses.is_dataclass(getattr(cls, "options", None)):
            raise TypeError(
                f"residual variant {name!r}: {cls.__name__}.options must be its options dataclass"
            )
        _REGISTRY[name] = cls
        cls.variant_name = name
        return cls

    return deco


def variant_modules() -> list[str]:
    """Dotted names of the modules beside this one, each of which may register variants.

    In the package these are the modules of ``attnres/residuals/``. In the remote-code copy of a
    Hugging Face folder (:mod:`attnres.hf.remote_code`) the package is flattened, this file is
    ``residuals_registry.py`` and the variants are the ``residuals_*`` files beside it: the same rule
    (same folder, same name prefix as this file's) finds them in both.
    """
    here = Path(__file__)
    prefix = here.stem.removesuffix("registry")
    package = __name__.rpartition(".")[0]
    return [
        f"{package}.{info.name}"
        for info in sorted(pkgutil.iter_modules([str(here.parent)]), key=lambda m: m.name)
        if info.name.startswith(prefix) and info.name != here.stem
    ]


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in variant_modules():
        importlib.import_module(name)
    _loaded = True


def variant_names() -> list[str]:
    """All registered variant names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def variant_class(name: str) -> type:
    """The scheme class registered as ``name``; a ConfigError (a ValueError) listing the valid names
    otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a malformed config file
        raise ConfigError(
            f"unknown residual variant {name!r}; valid variants: {', '.join(variant_names())}"
        ) from None


def options_class(name: str) -> type[Any]:
    """The options dataclass of variant ``name`` (a ``ResidualConfig``; raises like :func:`variant_class`)."""
    return variant_class(name).options


def variants_with_option(field: str) -> list[str]:
    """The variants whose options include ``field``, sorted."""
    return [v for v in variant_names() if field in {f.name for f in dataclasses.fields(options_class(v))}]
