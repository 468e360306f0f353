"""The tree is ruff-clean (lint rules and formatting from ``pyproject.toml``) and its imports keep
the layers of ``docs/architecture.md`` (the ``[tool.importlinter]`` contracts), so CI enforces both.

ruff is pinned to one minor version in the ``dev`` extra: a new release's rules or formatting style
arrive as a deliberate upgrade, not as a red CI on unchanged code. import-linter is pinned to one
major version for the same reason.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(command: list[str]) -> None:
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} failed:\n{result.stdout}{result.stderr}"


def test_import_layers() -> None:
    """``lint-imports``: no module imports from a layer above its own or from an independent sibling,
    and no two sibling modules import each other (function-level imports included)."""
    pytest.importorskip("importlinter", reason="import-linter comes with the dev extra")
    # this checkout's package, whichever one the environment has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}{result.stderr}"


def test_every_top_level_module_has_a_layer() -> None:
    """A new package or module under ``attnres`` must be placed in the ``layers`` contract: one left
    out would be checked by nothing but the cycle contract."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {f"attnres.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "src" / "attnres")])}
    assert modules - placed == set(), "add these to the layers contract in pyproject.toml"
    assert placed - modules == set(), "the layers contract names modules that do not exist"
