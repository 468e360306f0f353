"""Self-contained Hugging Face folders: the model's code, generated from this package's own source.

``save_pretrained`` (and so ``attnres convert --to-hf``) writes, beside the weights, the Python
code that transformers runs for ``from_pretrained(folder, trust_remote_code=True)``, plus an
``auto_map`` in ``config.json`` pointing at it. A process that never imported attnres, or where
attnres is not installed, then loads the folder with transformers and torch alone.

**How the code is made.** Nothing is hand-copied: :func:`bundle_sources` takes the modules the
wrapper needs (``attnres.hf.config``, ``attnres.hf.modeling``, this module, every residual variant
module, and everything they import from ``attnres``), reads each one's source file, and rewrites
only its ``attnres`` imports, into the flat layout transformers requires (one folder, relative
imports ``from .x import y``; ``attnres/ops/fused.py`` becomes ``ops_fused.py``). Each file says
which source it was generated from. ``modeling_attnres.py``, the file ``auto_map`` names, imports
the three classes and every other file of the bundle (transformers copies only the files named
by ``from .x import`` lines of the file it loads, recursively). The residual registry finds the
variant files in the flat folder by the same rule as in the package
(:func:`attnres.residuals.registry.variant_modules`).

**Kernels.** The copy runs the PyTorch-ops paths only. The two kernel modules,
``attnres.ops.native`` (C++ kernels built on first use) and ``attnres.ops.triton`` (Triton), are
replaced by stand-ins (:data:`KERNEL_STUBS`) that report them unavailable, so ``kernels="auto"``
picks the PyTorch ops, exactly as in a package without a compiler or Triton.

**Saving from the copy.** A model loaded with remote code saves through the same
``save_pretrained``; there the files of the bundle are copied from the folder it was loaded from.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import shutil
from pathlib import Path

from attnres.residuals.registry import variant_modules

PACKAGE = "attnres"
#: the file ``auto_map`` names (it imports every other file of the bundle)
ENTRY = "modeling_attnres"
AUTO_MAP = {
    "AutoConfig": f"{ENTRY}.AttnResConfig",
    "AutoModel": f"{ENTRY}.AttnResModel",
    "AutoModelForCausalLM": f"{ENTRY}.AttnResForCausalLM",
}
#: modules whose code the bundle starts from; their ``attnres`` imports pull in the rest
ROOTS = ("attnres.hf.config", "attnres.hf.modeling", __name__)


#: stand-ins for the kernel modules, which need a C++ build or Triton: no kernels, PyTorch ops only
def _kernel_stub(doc: str, available: str, why: str) -> str:
    """A stand-in kernel module: ``available()`` says no, and every kernel name it is asked for
    (module ``__getattr__``, so it need not list the ops the package imports) raises ``why``."""
    return f'''"""{doc}"""


def {available}():
    """The remote-code copy of AttnRes has no such kernels."""
    return {"None" if available == "cpu_kernels" else "False"}


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError({why!r})

    return unavailable
'''


#: stand-ins for the kernel modules, which a bundle does not carry
KERNEL_STUBS = {
    "attnres.ops.native": _kernel_stub(
        "attnres.ops.native in remote code: no native CPU kernels (PyTorch ops).",
        "cpu_kernels",
        "the remote-code copy of AttnRes has no native kernels (cpu_kernels() is None)",
    ),
    "attnres.ops.triton": _kernel_stub(
        "attnres.ops.triton in remote code: no Triton kernels (PyTorch ops).",
        "available",
        "the remote-code copy of AttnRes has no Triton kernels; install attnres[gpu]",
    ),
}

#: whether this module is the package's own (``False`` inside a bundle loaded with remote code)
IN_PACKAGE = __name__ == "attnres.hf.remote_code"


def flat_name(module: str) -> str:
    """The bundle file stem of package module ``module``: ``attnres.ops.fused`` -> ``ops_fused``."""
    return module.removeprefix(f"{PACKAGE}.").replace(".", "_")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _rewrite(module: str, source: str) -> tuple[str, set[str]]:
    """``source`` with its ``attnres`` imports made relative and flat; and the modules they name."""
    lines = source.splitlines(keepends=True)
    needed: set[str] = set()
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(
            a.name == PACKAGE or a.name.startswith(f"{PACKAGE}.") for a in node.names
        ):
            raise ValueError(
                f"{module}:{node.lineno}: `import {PACKAGE}...` cannot be bundled; use `from ... import`"
            )
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module != PACKAGE and not node.module.startswith(f"{PACKAGE}."):
            continue
        subs = [_is_module(f"{node.module}.{a.name}") for a in node.names]
        names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        if all(subs):  # ``from attnres.ops import triton as t``: submodules, bound as modules
            targets = [f"{node.module}.{a.name}" for a in node.names]
            parts = [
                flat_name(t) + (f" as {a.asname or a.name}") for t, a in zip(targets, node.names, strict=True)
            ]
            text = f"from . import {', '.join(parts)}"
        elif any(subs):
            raise ValueError(f"{module}:{node.lineno}: import submodules and names in separate statements")
        else:
            targets = [node.module]
            text = f"from .{flat_name(node.module)} import {names}"
        rest = lines[node.end_lineno - 1][node.end_col_offset :].strip()
        if lines[node.lineno - 1][: node.col_offset].strip() or (rest and not rest.startswith("#")):
            raise ValueError(f"{module}:{node.lineno}: put the attnres import on lines of its own")
        needed.update(targets)
        edits.append((node.lineno - 1, node.end_lineno, " " * node.col_offset + text + "\n"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "".join(lines), needed


def bundle_sources() -> dict[str, str]:
    """File name -> text of every file of the remote-code bundle, generated from the package source.

    Only callable in the package (:data:`IN_PACKAGE`); a bundle's own files are copied instead.
    """
    if not IN_PACKAGE:
        raise RuntimeError("bundle_sources() generates from the attnres package; this is a bundled copy")
    files: dict[str, str] = {}
    todo, seen = [*ROOTS, *variant_modules()], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module in KERNEL_STUBS:
            files[flat_name(module) + ".py"] = KERNEL_STUBS[module]
            continue
        path = Path(importlib.util.find_spec(module).origin)
        rel = path.relative_to(Path(importlib.util.find_spec(PACKAGE).origin).parent.parent)
        text, needed = _rewrite(module, path.read_text())
        files[flat_name(module) + ".py"] = (
            f"# Generated from {rel.as_posix()} by {__name__}; do not edit.\n" + text
        )
        todo.extend(needed)
    files[ENTRY + ".py"] = _entry_source(files)
    return files


def _entry_source(files: dict[str, str]) -> str:
    """The file ``auto_map`` names: the Auto classes, and an import of every other bundled file."""
    lines = [
        f'"""AttnRes for transformers (trust_remote_code=True): generated by {__name__}; do not edit."""\n\n',
        "from .hf_config import AttnResConfig\n",
        "from .hf_modeling import AttnResForCausalLM, AttnResModel\n\n",
        "# transformers copies only the files named by `from .x import` lines (recursively) of the file\n",
        "# it loads: name every file of the bundle (the residual variants register themselves on import).\n",
        *(f"from .{Path(f).stem} import __name__ as _{Path(f).stem}\n" for f in sorted(files)),
        '\n__all__ = ["AttnResConfig", "AttnResForCausalLM", "AttnResModel"]\n',
    ]
    return "".join(lines)


def write_remote_code(directory: str | Path) -> list[Path]:
    """Write the bundle into ``directory`` and point ``config.json``'s ``auto_map`` at it.

    In the package the files are generated (:func:`bundle_sources`); in a bundle loaded with remote
    code they are copied from the folder this module was loaded from. Returns the files written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if IN_PACKAGE:
        for name, text in bundle_sources().items():
            (directory / name).write_text(text)
            written.append(directory / name)
    else:
        for path in sorted(Path(__file__).parent.glob("*.py")):
            if path.name != "__init__.py" and path.resolve() != (directory / path.name).resolve():
                shutil.copyfile(path, directory / path.name)
                written.append(directory / path.name)
    config = directory / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["auto_map"] = {**data.get("auto_map", {}), **AUTO_MAP}
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return written
