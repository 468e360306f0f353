"""``attnres report`` on a compare directory and on a single run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnres.analysis.report import write_report
from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.train import get_preset
from attnres.train.compare import compare


@pytest.mark.slow  # trains 6 tiny runs: ~1 min on an idle 2-core machine
def test_report_of_a_compare_dir_and_of_a_run_dir(tmp_path, cache_dir, capsys):
    cfg = apply_overrides(
        get_preset("tiny"), {"data.cache_dir": cache_dir, "train.steps": "4", "train.eval_every": "2"}
    )
    compare(cfg, ["prenorm", "full", "mhc"], 2, tmp_path, log=lambda _: None)
    text = write_report(tmp_path).read_text()
    for name in ("loss_curves.png", "profiles.png", "read_entropy.png", "depth_weights_full.png"):
        assert f"]({name})" in text and (tmp_path / name).stat().st_size > 10_000, name
    assert not (tmp_path / "depth_weights_mhc.png").exists()  # no depth reads, no heatmap
    assert "| prenorm | 2 |" in text and "(baseline)" in text and "n = 2" in text
    main(["report", str(tmp_path / "full-s0")])  # a single run works too
    assert "report.md" in capsys.readouterr().out
    assert "depth_weights_full.png" in (tmp_path / "full-s0" / "report.md").read_text()


def test_report_of_an_unrelated_dir_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnres compare"):
        write_report(tmp_path)


def test_report_table_and_plots_from_finished_runs(tmp_path, fake_run):
    for seed, (a, b) in enumerate([(2.0, 1.9), (2.2, 2.0), (2.1, 2.05)]):
        fake_run(tmp_path / f"prenorm-s{seed}", "prenorm", seed, a)
        fake_run(tmp_path / f"block-s{seed}", "block", seed, b)
    text = write_report(tmp_path).read_text()
    # block - prenorm per seed: -0.1, -0.2, -0.05 -> mean -0.1167, t(2) = 4.303
    assert "| block | 3 | 1.9833 ± 0.0764 | -0.1167 [-0.3064, +0.0731], n = 3 |" in text
    for name in ("loss_curves.png", "profiles.png", "read_entropy.png", "depth_weights_block.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert not (tmp_path / "depth_weights_prenorm.png").exists()


COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compare_quick"


def test_report_of_the_committed_compare_quick_regenerates_it_byte_for_byte(tmp_path):
    """The committed runs keep result.json and diagnostics.json only (no config.json, no
    metrics.jsonl): the report is made from those, is the committed report.md, and a second run
    writes the same PNG bytes, with no matplotlib version in them."""
    root = tmp_path / "compare_quick"
    shutil.copytree(COMMITTED, root, ignore=shutil.ignore_patterns("*.png", "report.md"))
    text = write_report(root).read_text()
    assert text == (COMMITTED / "report.md").read_text()
    assert "| rezero | 2 | 4.5648 ± 0.0003 | -0.1816 [-0.3439, -0.0192], n = 2 |" in text
    pngs = sorted(p.name for p in root.glob("*.png"))
    assert pngs == sorted(p.name for p in COMMITTED.glob("*.png"))
    assert "final_losses.png" in pngs and "loss_curves.png" not in pngs  # no metrics.jsonl committed
    first = {name: (root / name).read_bytes() for name in pngs}
    assert not any(b"matplotlib" in data for data in first.values())
    write_report(root)
    assert {name: (root / name).read_bytes() for name in pngs} == first
    assert (root / "report.md").read_text() == text
