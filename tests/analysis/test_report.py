"""``attnres report`` on a compare directory and on a single run directory."""

from __future__ import annotations

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
