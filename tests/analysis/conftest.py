"""Helpers for the analysis tests: finished runs made without training."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from attnres.analysis.diagnostics import save_diagnostics
from attnres.analysis.results import RunResult
from attnres.configs import apply_overrides
from attnres.model import Transformer
from attnres.train import get_preset


def make_fake_run(run_dir: Path, variant: str, seed: int, loss: float) -> None:
    """A finished run without training: config, metrics, result and diagnostics of an untrained model."""
    cfg = apply_overrides(get_preset("tiny"), {"model.residual.variant": variant})
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": loss + 1 / s, "val_loss": loss + 1 / s}) + "\n" for s in (1, 2)
        )
    )
    result = RunResult(variant, seed, 2, loss, loss, 100.0, 1000, 256, 1e6, 1.0)
    (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result)))
    torch.manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    save_diagnostics(Transformer(cfg.model), x, x, run_dir)


@pytest.fixture
def fake_run() -> Callable[[Path, str, int, float], None]:
    """:func:`make_fake_run`, for tests."""
    return make_fake_run
