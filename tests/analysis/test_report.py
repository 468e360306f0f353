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


def _fake_run(run_dir, variant, seed, loss):
    """A finished run without training: config, metrics, result and diagnostics of an untrained model."""
    import dataclasses
    import json

    import torch

    from attnres.analysis.diagnostics import save_diagnostics
    from attnres.model import Transformer
    from attnres.train.loop import RunResult

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


def test_report_table_and_plots_from_finished_runs(tmp_path):
    for seed, (a, b) in enumerate([(2.0, 1.9), (2.2, 2.0), (2.1, 2.05)]):
        _fake_run(tmp_path / f"prenorm-s{seed}", "prenorm", seed, a)
        _fake_run(tmp_path / f"block-s{seed}", "block", seed, b)
    text = write_report(tmp_path).read_text()
    # block - prenorm per seed: -0.1, -0.2, -0.05 -> mean -0.1167, t(2) = 4.303
    assert "| block | 3 | 1.9833 ± 0.0764 | -0.1167 [-0.3064, +0.0731], n = 3 |" in text
    for name in ("loss_curves.png", "profiles.png", "read_entropy.png", "depth_weights_block.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert not (tmp_path / "depth_weights_prenorm.png").exists()
