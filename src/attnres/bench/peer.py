"""``attnres bench train --peer DIR``: a public nanoGPT-style AttnRes implementation as one more arm.

Nothing here is vendored or downloaded: ``DIR`` is a local checkout the user names, and the arm
exists only then. Loading it **runs the peer's code** (its ``model.py`` and whatever that imports)
in the benchmark's process, with the user's rights: point it only at code you would run anyway.

The adapter contract, what ``DIR`` must hold (nanoGPT's conventions):

- ``DIR/model.py`` defines ``GPTConfig`` and ``GPT``, an ``nn.Module``. ``GPT(config)`` builds the
  model; ``GPT.forward(idx, targets)`` takes token ids and targets, both ``[B, T]`` int64, and
  returns ``(logits, loss)``: logits ``[B, T, vocab]``, loss a scalar (mean cross-entropy).
- ``GPTConfig`` is a dataclass, or a class whose default instance ``GPTConfig()`` holds its fields
  as attributes, or whose ``__init__`` names them; it is built as ``GPTConfig(**fields)``.
- While ``model.py`` loads, ``DIR`` is first on ``sys.path``, so its sibling modules import, even
  one that shares a name with an installed package (``attnres.py``, say). The module gets a unique
  name, and ``sys.path`` and the names it shadowed in ``sys.modules`` are restored afterwards, so
  the peer must import its siblings when ``model.py`` loads, not later inside a call. Modules
  elsewhere in the checkout import only if they are on ``PYTHONPATH``.

The benchmark's shape is mapped to the first field in each row that the peer's config has; a row
it has none of is dropped (the peer's default stays) with a note on stderr and in the JSON:

=============  ===============================================================================
ours           the peer's config fields tried, in order
=============  ===============================================================================
``d_model``    ``n_embd``, ``d_model``, ``dim``, ``hidden_size``
``n_layers``   ``n_layer``, ``n_layers``, ``num_layers``
``n_heads``    ``n_head``, ``n_heads``, ``num_heads``
``seq_len``    ``block_size`` (nanoGPT's name for the context length), ``sequence_len``,
               ``seq_len``, ``max_seq_len``
``vocab_size`` ``vocab_size``
=============  ===============================================================================

Where present, ``dropout`` is set to 0 and ``bias`` to ``False``, as in our model. An AttnRes
variant field (``attnres_variant``, ``attn_res_variant``) is set to ``"block"``, and the block
size to that of our ``block`` arm, ``S`` sublayers (``S = 1`` when the variant is ``"full"``):
``attnres_block_size`` counts sublayers (tokenbender's nanoGPT, FLA), ``attn_res_block_size``
Transformer layers (Kimi K3), ``attnres_num_blocks`` / ``attn_res_num_blocks`` blocks.
``--peer-config KEY=VALUE`` (repeatable; a Python literal, else a string) sets any field last.

The peer's architecture is its own (nanoGPT: LayerNorm, GELU MLP, learned positions), so its
ratio to our prenorm is its whole model's cost against ours at the same shape, not its AttnRes
overhead alone; the JSON records each side's parameter count.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from attnres.residuals.attnres import default_block_size

PREFIX = "peer:"

SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "d_model": ("n_embd", "d_model", "dim", "hidden_size"),
    "n_layers": ("n_layer", "n_layers", "num_layers"),
    "n_heads": ("n_head", "n_heads", "num_heads"),
    "seq_len": ("block_size", "sequence_len", "seq_len", "max_seq_len"),
    "vocab_size": ("vocab_size",),
}
LIKE_OURS: dict[str, object] = {"dropout": 0.0, "bias": False}
VARIANT_FIELDS = ("attnres_variant", "attn_res_variant")
#: AttnRes block-size fields and the unit each counts in
BLOCK_FIELDS = {
    "attnres_block_size": "sublayers",
    "attn_res_block_size": "layers",
    "attnres_num_blocks": "blocks",
    "attn_res_num_blocks": "blocks",
}

_loads = itertools.count()


class PeerError(ValueError):
    """The peer checkout does not meet the adapter contract (the message says how)."""


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """What ``--peer`` and ``--peer-config`` name: picklable, so a ``--pairwise`` child can load it."""

    directory: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        return PREFIX + Path(self.directory).expanduser().resolve().name


def parse_overrides(items: list[str] | None) -> tuple[tuple[str, object], ...]:
    """``KEY=VALUE`` strings to pairs; a value is a Python literal where it parses as one."""
    pairs = []
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise PeerError(f"--peer-config {item!r}: expected KEY=VALUE, e.g. attnres_variant=full")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        pairs.append((key, value))
    return tuple(pairs)


@dataclasses.dataclass
class Peer:
    """A loaded peer: its classes, the config built for the benchmark's shape, and what was mapped."""

    label: str
    directory: Path
    gpt: type[nn.Module]
    config: object
    applied: dict[str, object]
    notes: list[str]

    def build(self) -> nn.Module:
        """``GPT(config)``, seeded like the other arms."""
        torch.manual_seed(0)
        try:
            return self.gpt(self.config)
        except Exception as e:
            raise PeerError(
                f"{self.label}: GPT(config) failed ({type(e).__name__}: {e}) with {self.applied}; "
                "set a field with --peer-config KEY=VALUE"
            ) from e

    def check(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
        """One no-grad forward: ``(logits [B, T, vocab], scalar loss)``, or a :class:`PeerError`."""
        try:
            with torch.no_grad():
                out = model(inputs, targets)
        except Exception as e:
            raise PeerError(
                f"{self.label}: GPT.forward(idx, targets) failed on a {tuple(inputs.shape)} batch "
                f"({type(e).__name__}: {e}); its config: {self.applied}"
                + "".join(f"; {n}" for n in self.notes)
            ) from e
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise PeerError(f"{self.label}: GPT.forward(idx, targets) returned {type(out).__name__}, "
                            "not (logits, loss)")  # fmt: skip
        logits, loss = out[0], out[1]
        want = (*inputs.shape, vocab_size)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise PeerError(
                f"{self.label}: logits have shape {got}, expected (batch, seq_len, vocab) = {want}; "
                f"its config: {self.applied}" + "".join(f"; {n}" for n in self.notes)
            )
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise PeerError(f"{self.label}: the loss is {got}, expected a scalar tensor")

    def info(self, model: nn.Module) -> dict[str, object]:
        """The JSON's ``peer`` entry."""
        return {
            "arm": self.label,
            "dir": str(self.directory),
            "config": {
                k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
                for k, v in self.applied.items()
            },
            "notes": self.notes,
            "params": sum(p.numel() for p in model.parameters()),
        }


def load(spec: PeerSpec, shape: dict, vocab_size: int) -> Peer:
    """Load ``spec.directory/model.py`` and build a ``GPTConfig`` for ``shape`` (``bench train``'s sizes)."""
    directory = Path(spec.directory).expanduser().resolve()
    label = spec.label
    if not directory.is_dir():
        raise PeerError(f"--peer {spec.directory}: no such directory")
    if not (directory / "model.py").is_file():
        found = [str(p.parent.relative_to(directory)) for depth in ("*", "*/*") for p in
                 sorted(directory.glob(f"{depth}/model.py"))]  # fmt: skip
        hint = f"; model.py files below it: {', '.join(found[:5])}" if found else ""
        raise PeerError(f"--peer {spec.directory}: no model.py in it (nanoGPT's layout){hint}")
    module = _import(directory, label)
    missing = [n for n in ("GPTConfig", "GPT") if not hasattr(module, n)]
    if missing:
        raise PeerError(
            f"{label}: {directory / 'model.py'} defines no {' or '.join(missing)} (nanoGPT's names)"
        )
    gpt, config_cls = module.GPT, module.GPTConfig
    if not (isinstance(gpt, type) and issubclass(gpt, nn.Module)):
        raise PeerError(f"{label}: GPT in {directory / 'model.py'} is not an nn.Module class")
    _check_forward(gpt, label)
    fields = _config_fields(config_cls, label)
    values, notes = _map_shape(fields, shape, vocab_size, dict(spec.overrides))
    try:
        config = config_cls(**values)
    except Exception as e:
        raise PeerError(f"{label}: GPTConfig(**{values}) failed ({type(e).__name__}: {e})") from e
    return Peer(label, directory, gpt, config, values, notes)


def _map_shape(
    fields: set[str], shape: dict, vocab_size: int, overrides: dict[str, object]
) -> tuple[dict[str, object], list[str]]:
    ours = {**{k: v for k, v in shape.items() if k != "batch"}, "vocab_size": vocab_size}
    values: dict[str, object] = {}
    notes = []
    for key, names in SHAPE_FIELDS.items():
        name = next((n for n in names if n in fields), None)
        if name is None:
            notes.append(f"GPTConfig has no field for {key}={ours[key]} (tried {', '.join(names)}); "
                         "the peer's default is used")  # fmt: skip
        else:
            values[name] = ours[key]
    values.update({k: v for k, v in LIKE_OURS.items() if k in fields})
    variant_field = next((n for n in VARIANT_FIELDS if n in fields), None)
    if variant_field is not None:
        values[variant_field] = "block"
    variant = overrides.get(variant_field, values.get(variant_field)) if variant_field else None
    n_sublayers = 2 * shape["n_layers"]
    block = 1 if variant == "full" else default_block_size(n_sublayers)
    for name, unit in BLOCK_FIELDS.items():
        if name not in fields:
            continue
        if unit == "sublayers":
            values[name] = block
        elif unit == "blocks":
            values[name] = math.ceil(n_sublayers / block)
        else:
            values[name] = max(1, block // 2)
            if block % 2:
                notes.append(f"{name} counts Transformer layers: {block} sublayer(s) rounds to 1 layer")
    if variant_field is None and not any(n in fields for n in BLOCK_FIELDS):
        tried = ", ".join((*VARIANT_FIELDS, *BLOCK_FIELDS))
        notes.append(f"GPTConfig has no AttnRes variant or block-size field (tried {tried}); "
                     "set one with --peer-config KEY=VALUE")  # fmt: skip
    for key, value in overrides.items():
        if key not in fields:
            notes.append(f"--peer-config {key}: not a field GPTConfig declares; passed anyway")
        values[key] = value
    return values, notes


@contextlib.contextmanager
def _importing_from(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path``, its top-level names unshadowed; both restored on exit."""
    local = {p.stem for p in directory.glob("*.py")}
    local |= {p.name for p in directory.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    shadowed = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in local}
    saved_path = list(sys.path)
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k.split(".")[0] in local]:
            del sys.modules[k]
        sys.modules.update(shadowed)


def _import(directory: Path, label: str) -> ModuleType:
    path = directory / "model.py"
    name = f"attnres_peer_{next(_loads)}_" + re.sub(r"\W", "_", directory.name)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _importing_from(directory):
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PeerError(f"{label}: importing {path} failed ({type(e).__name__}: {e})") from e
    return module


def _check_forward(gpt: type, label: str) -> None:
    params = list(inspect.signature(gpt.forward).parameters.values())[1:]  # after self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    if not takes_two or len(required) > 2:
        raise PeerError(f"{label}: GPT.forward{inspect.signature(gpt.forward)} is not nanoGPT's "
                        "forward(idx, targets) -> (logits, loss)")  # fmt: skip


def _config_fields(config_cls: Callable, label: str) -> set[str]:
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    try:
        return {k for k in vars(config_cls()) if not k.startswith("_")}
    except Exception:
        params = inspect.signature(config_cls).parameters.values()
        names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not names:
            raise PeerError(f"{label}: cannot tell GPTConfig's fields (GPTConfig() fails and its "
                            "__init__ names none)") from None  # fmt: skip
        return names
