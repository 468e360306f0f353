"""Dataclass configs: strict loading from dicts and type-checked dotted overrides.

Shared by the model and training configs. An unknown key is always an error that suggests the
nearest valid ones, because a silently ignored typo in an experiment config produces a wrong answer.
Configs also load from JSON or YAML files (:func:`load_config_file`, :func:`apply_dict`), and
:func:`describe_keys` lists every key with its type, default and the one-line doc from its
dataclass's ``Attributes:`` docstring section.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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


def _coerce(value: Any, tp: Any, key: str, base: dict[str, Any] | None = None) -> Any:
    """Convert ``value`` (a Python value or an override string) to ``tp``, or raise ConfigError.

    ``base``: for a dataclass section, the values its fields take where ``value`` has none."""
    tp, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=f"{key}.", base=base)
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


def unknown_key_message(key: str, valid: list[str]) -> str:
    """``unknown config key 'train.lr'; did you mean optim.lr?``: the valid keys nearest ``key``.

    Keys with the same last part come first (``train.lr`` -> ``optim.lr``), then close spellings
    (:func:`difflib.get_close_matches`); then the names in ``key``'s section (``model.*``), or the
    sections when ``key``'s is not one. Never the whole list of keys.
    """
    leaf = key.rpartition(".")[2]
    near = [k for k in valid if k.rpartition(".")[2] == leaf]
    near += [k for k in difflib.get_close_matches(key, valid, n=3, cutoff=0.6) if k not in near]
    message = f"unknown config key {key!r}"
    if near:
        message += f"; did you mean {' or '.join(near[:3])}?"
    section = key.rpartition(".")[0]
    inside = [k[len(section) + 1 :] for k in valid if section and k.startswith(section + ".")]
    # the section's own keys in full, a subsection as section.sub.*
    names = dict.fromkeys(
        f"{section}.{k}" if "." not in k else f"{section}.{k.split('.')[0]}.*" for k in inside
    )
    if names:
        return f"{message} (keys in {section}: {', '.join(names)})"
    if near:
        return message
    sections = dict.fromkeys(k.split(".")[0] for k in valid)
    return f"{message}; keys start with: {', '.join(s + '.' for s in sections)}"


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: dict[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise :class:`ConfigError`.

    ``base`` (a nested dict, e.g. ``dataclasses.asdict`` of a config) supplies the fields ``data``
    leaves out; without it they take their defaults. A dataclass with a ``resolve_config(data,
    base, prefix)`` classmethod is a section whose class depends on its contents (the residual
    section: one options class per variant): it returns the class to build and the keys to build it
    from, and raises for keys that class lacks; ``base`` keys the class lacks are dropped.
    """
    base = base or {}
    cls, data = _resolve(cls, data, base, prefix)
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            "; ".join(unknown_key_message(prefix + k, [prefix + v for v in types_]) for k in unknown)
        )
    kwargs = {}
    for name, tp in types_.items():
        below = base.get(name) if isinstance(base.get(name), dict) else None
        if name in data:
            kwargs[name] = _coerce(data[name], tp, prefix + name, below)
        elif name in base:
            kwargs[name] = _coerce({} if below is not None else base[name], tp, prefix + name, below)
    return cls(**kwargs)


def _resolve(
    cls: type, data: dict[str, Any], base: dict[str, Any], prefix: str
) -> tuple[type, dict[str, Any]]:
    """``cls`` and ``data``, or what ``cls.resolve_config`` makes of them (see :func:`from_dict`)."""
    resolve = getattr(cls, "resolve_config", None)
    return resolve(data, base, prefix) if resolve is not None else (cls, data)


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of dataclass ``cfg``: a class, or an instance (whose sections may be
    subclasses of their declared types, e.g. the residual section's options class)."""
    keys: list[str] = []
    for name, tp in _field_types(cfg if isinstance(cfg, type) else type(cfg)).items():
        inner = _unwrap_optional(tp)[0] if isinstance(cfg, type) else getattr(cfg, name)
        if dataclasses.is_dataclass(inner):
            keys += valid_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _accepted_keys(cls: type, data: dict[str, Any], base: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted leaf keys a ``from_dict(cls, data, base=base)`` accepts: the fields of the classes
    ``data`` resolves to, and keys a ``resolve_config`` drops as obsolete."""
    cls, kept = _resolve(cls, data, base, prefix)
    keys = [prefix + k for k in data if k not in kept]
    for name, tp in _field_types(cls).items():
        inner = _unwrap_optional(tp)[0]
        if dataclasses.is_dataclass(inner):
            sub, below = kept.get(name), base.get(name)
            sub = sub if isinstance(sub, dict) else {}
            keys += _accepted_keys(inner, sub, below if isinstance(below, dict) else {}, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted ``{"section.key": "value"}`` overrides applied.

    Values (strings from the command line, or the JSON/YAML values of a config file) are parsed to
    the field's declared type; the copy is re-validated by each dataclass's ``__post_init__``. Keys
    are those of the config the overrides make: ``model.residual.variant=hc`` makes the keys of
    ``hc``'s options valid, and drops the options of ``cfg``'s variant that ``hc`` lacks.
    """
    given: dict[str, Any] = {}
    for dotted, raw in overrides.items():
        *path, leaf = dotted.split(".")
        node = given
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = raw
    base = dataclasses.asdict(cfg)
    all_keys = _accepted_keys(type(cfg), given, base)
    for dotted in overrides:
        if dotted not in all_keys:
            raise ConfigError(unknown_key_message(dotted, all_keys))
    return from_dict(type(cfg), given, base=base)


def config_diff(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys (``"optim.lr"``) where dataclass configs ``a`` and ``b`` differ, except ``ignore``."""
    skip = set(ignore)

    missing = object()

    def walk(x: dict[str, Any], y: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k in [*x, *(k for k in y if k not in x)]:  # a section's keys may differ (residual options)
            key = prefix + k
            u, v = x.get(k, missing), y.get(k, missing)
            if isinstance(u, dict) and isinstance(v, dict):
                out += walk(u, v, key + ".")
            elif u != v and key not in skip:
                out.append(key)
        return out

    return walk(dataclasses.asdict(a), dataclasses.asdict(b), "")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys: ``{"model": {"d_model": 64}}`` -> ``{"model.d_model": 64}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict in a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) config file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModuleNotFoundError: a YAML file without PyYAML installed.
        ConfigError: the file does not parse, or does not hold a mapping of sections.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"{path} is YAML, which needs PyYAML: pip install 'attnres[yaml]' (or use JSON)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(
                f"{path} is not valid YAML ({where}{problem or str(e).splitlines()[0]})"
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); YAML files end in .yaml or .yml") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def apply_dict(cfg: T, data: dict[str, Any]) -> T:
    """A copy of ``cfg`` with the (partial, nested) ``data`` of a config file laid over it.

    Keys absent from ``data`` keep ``cfg``'s values; every key present is checked and typed as
    :func:`apply_overrides` checks a command-line override.
    """
    return apply_overrides(cfg, flatten(data))


class KeyDoc(NamedTuple):
    """One config key for ``--help``: dotted name, type, default and one-line description."""

    key: str
    type: str
    default: Any
    doc: str


_ATTRIBUTE = re.compile(r"^(\s+)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)*):\s+(.*)$")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> description, parsed from the ``Attributes:`` part of ``cls``'s docstring.

    An entry is ``name: text`` (or ``a, b: text`` for several fields), continued by lines indented
    deeper than it. Entries may sit under several headed groups after ``Attributes:``; only names
    of ``cls``'s fields count. A field inherited from a dataclass base is documented in the base's
    docstring (a subclass's entry wins). RST double backticks are dropped.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__doc__" in vars(klass):
            docs.update(_attribute_docs(klass.__doc__ or "", names))
    return docs


def _attribute_docs(doc: str, names: set[str]) -> dict[str, str]:
    _, found, rest = inspect.cleandoc(doc).partition("Attributes:")
    if not found:
        return {}
    entries: list[tuple[list[str], list[str]]] = []  # (field names, lines of text)
    indent, open_entry = -1, False
    for line in rest.splitlines():
        match = _ATTRIBUTE.match(line)
        fields = [n.strip() for n in match.group(2).split(",")] if match else []
        if match and set(fields) <= names:
            indent, open_entry = len(match.group(1)), True
            entries.append((fields, [match.group(3).strip()]))
        elif open_entry and line.strip() and len(line) - len(line.lstrip()) > indent:
            entries[-1][1].append(line.strip())
        else:  # a blank line or a group heading ends the entry
            open_entry = False
    return {name: " ".join(text).replace("``", "") for fields, text in entries for name in fields}


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (up to a ``.`` followed by a space and a capital letter)."""
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text.strip(), maxsplit=1)[0]


def type_name(tp: Any) -> str:
    """A field type as written in the source: ``int``, ``int | None``, ``tuple[str, ...]``."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    name = str(tp).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"<class '(\w+)'>", r"\1", name)


def describe_keys(cfg: Any, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass instance ``cfg`` with its type, value in ``cfg`` and one-line doc.

    The doc is the first sentence of the field's entry in its dataclass's ``Attributes:``
    docstring (:func:`field_docs`); ``""`` for an undocumented field.
    """
    cls = type(cfg)
    docs = field_docs(cls)
    out: list[KeyDoc] = []
    for name, tp in _field_types(cls).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            out += describe_keys(value, f"{prefix}{name}.")
        else:
            out.append(KeyDoc(prefix + name, type_name(tp), value, first_sentence(docs.get(name, ""))))
    return out
