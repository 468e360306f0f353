"""The tree is ruff-clean (lint rules and formatting from ``pyproject.toml``), so CI enforces it.

ruff is pinned to one minor version in the ``dev`` extra: a new release's rules or formatting style
arrive as a deliberate upgrade, not as a red CI on unchanged code.
"""

from __future__ import annotations

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
