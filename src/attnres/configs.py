"""Dataclass configs: strict loading from dicts and type-checked dotted overrides.

Shared by the model and training configs. An unknown key is always an error that lists the valid
ones, because a silently ignored typo in an experiment config produces a wrong answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message says how to fix it."""


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number; otherwise raise an error naming ``name``.

    NaN passes every comparison (``nan <= 0`` is false), so range checks alone let it through.

    Raises:
        TypeError: ``value`` is not a real number (a string, ``None``, a bool …).
        ValueError: ``value`` is NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool, not a float) ``>= minimum``; else an error naming ``name``.

    Raises:
        TypeError: ``value`` is not an integer (``2.5``, ``"4"``, ``True`` …).
        ValueError: ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_numbers(obj: Any, prefix: str = "") -> None:
    """Type-check every ``int`` and ``float`` field of dataclass ``obj`` (optional ones when set).

    Float fields must be finite (:func:`check_finite`), int fields integers (:func:`check_int`);
    errors name the field as ``prefix + name`` (``"model.init_std"``). Range checks stay with the
    dataclass, which runs them after this.
    """
    for name, tp in _field_types(type(obj)).items():
        tp, optional = _unwrap_optional(tp)
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if tp is float:
            check_finite(prefix + name, value)
        elif tp is int:
            check_int(prefix + name, value)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a Python value or an override string) to ``tp``, or raise ConfigError."""
    tp, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=f"{key}.")
        raise ConfigError(f"{key} is a section; set its fields as {key}.<field>=value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an int, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} expects an int, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a float, got {value!r}") from None
    if tp is str:
        return str(value)
    if typing.get_origin(tp) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_tp, key) for v in items if v != "")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise :class:`ConfigError`."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of dataclass ``cls``."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            keys += valid_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def apply_overrides(cfg: T, overrides: dict[str, str]) -> T:
    """Return a copy of ``cfg`` with dotted ``{"section.key": "value"}`` overrides applied.

    Values are parsed to the field's declared type; the copy is re-validated by each dataclass's
    ``__post_init__``.
    """
    data = dataclasses.asdict(cfg)
    all_keys = valid_keys(type(cfg))
    for dotted, raw in overrides.items():
        if dotted not in all_keys:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys: {', '.join(all_keys)}")
        node, node_cls = data, type(cfg)
        *path, leaf = dotted.split(".")
        for part in path:
            node_cls = _unwrap_optional(_field_types(node_cls)[part])[0]
            node = node[part]
        node[leaf] = _coerce(raw, _field_types(node_cls)[leaf], dotted)
    return from_dict(type(cfg), data)


def config_diff(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys (``"optim.lr"``) where dataclass configs ``a`` and ``b`` differ, except ``ignore``."""
    skip = set(ignore)

    def walk(x: dict[str, Any], y: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k in x:
            key = prefix + k
            if isinstance(x[k], dict):
                out += walk(x[k], y[k], key + ".")
            elif x[k] != y[k] and key not in skip:
                out.append(key)
        return out

    return walk(dataclasses.asdict(a), dataclasses.asdict(b), "")
