"""The pilot and learning-rate sweep reports, on synthetic committed results (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest

from attnres.analysis.experiments import (
    PilotRule,
    choose,
    load_groups,
    load_sweep,
    lr_sweep_report,
    main,
    pilot_report,
    setting_stats,
)
from attnres.analysis.power import seeds_needed
from attnres.configs import apply_overrides
from attnres.train import get_preset


def write_run(
    group: Path,
    variant: str,
    seed: int,
    loss: float,
    *,
    steps: int = 20,
    lr: float = 0.003,
    seconds: float = 60.0,
) -> None:
    """What an experiment commits for one finished run: ``config.json`` and ``result.json``."""
    cfg = apply_overrides(
        get_preset("tiny"),
        {"model.residual.variant": variant, "train.seed": seed, "train.steps": steps, "optim.lr": lr},
    )
    run = group / f"{variant}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tokens = steps * cfg.train.batch_size * cfg.model.seq_len
    result = {
        "variant": variant, "seed": seed, "steps": steps, "final_val_loss": loss, "final_train_loss": loss,
        "tokens_per_s": 1000.0, "n_params": 43232, "train_tokens": tokens, "train_flops": 1e9,
        "seconds": seconds,
    }  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))


# Block − PreNorm per seed: A spreads little, B a lot; the means are chosen to mislead (B "wins" big)
DIFFS = {"A": [-0.010, -0.012, -0.008, -0.011, -0.009], "B": [-0.20, 0.05, -0.15, 0.10, -0.30]}


def _pilot(root: Path, diffs: dict[str, list[float]], steps: dict[str, int], seconds: float = 60.0) -> None:
    for name, ds in diffs.items():
        for seed, d in enumerate(ds):
            base = 5.0 + 0.01 * seed
            write_run(root / "runs" / name, "prenorm", seed, base, steps=steps[name], seconds=seconds)
            write_run(root / "runs" / name, "block", seed, base + d, steps=steps[name], seconds=seconds)


def test_pilot_report_numbers_and_choice(tmp_path):
    _pilot(tmp_path, DIFFS, {"A": 20, "B": 40})
    write_run(tmp_path / "runs" / "C", "prenorm", 0, 5.0)  # started, no pair yet: listed, not eligible
    text = pilot_report(tmp_path).read_text()
    sd_a = statistics.stdev(DIFFS["A"])
    need_a = seeds_needed(0.02, sd_a)
    assert f"| {sd_a:.4f} |" in text
    assert "-0.0100 [" in text  # A's mean difference with its interval
    assert "| C |" in text and "| 0 |" in text  # C: zero pairs
    assert "**Setting A," in text
    assert (tmp_path / "paired_differences.png").stat().st_size > 0
    rule = PilotRule()
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path).items()]
    choice = choose(stats, rule)
    assert choice.setting == "A" and choice.seeds >= max(need_a, rule.min_seeds)
    # the seed count: the sd's upper bound as far as the budget affords
    a = stats[0]
    assert choice.seeds == max(a.seeds, min(a.seeds_upper, a.affordable))


def test_pilot_choice_ignores_the_mean_difference(tmp_path):
    shifted = {"A": [d + 0.5 for d in DIFFS["A"]], "B": [d - 0.5 for d in DIFFS["B"]]}  # Block "loses" on A
    _pilot(tmp_path, shifted, {"A": 20, "B": 40})
    rule = PilotRule()
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path).items()]
    assert choose(stats, rule).setting == "A"


def test_pilot_ties_go_to_more_tokens_and_nothing_feasible_says_so(tmp_path):
    same = [-0.010, -0.012, -0.008, -0.011, -0.009]
    _pilot(tmp_path / "tie", {"A": same, "B": same}, {"A": 20, "B": 40})
    rule = PilotRule()
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path / "tie").items()]
    assert choose(stats, rule).setting == "B"  # equal cost and spread: the longer runs
    # runs so slow that E1 cannot afford the seeds: the smallest detectable difference decides
    _pilot(tmp_path / "slow", DIFFS, {"A": 20, "B": 40}, seconds=3000.0)
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path / "slow").items()]
    choice = choose(stats, rule)
    assert choice.setting == "A" and choice.seeds == rule.min_seeds
    assert "No setting reaches 80% power" in choice.reason and "powered for differences of" in choice.reason


def test_pilot_degenerate_cases(tmp_path):
    _pilot(tmp_path / "one", {"A": [-0.01]}, {"A": 20})  # one seed: no spread, no choice
    text = pilot_report(tmp_path / "one").read_text()
    assert "None yet" in text and "(1 pair, no CI)" in text
    _pilot(tmp_path / "same", {"A": [0.0, 0.0, 0.0]}, {"A": 20})  # identical runs: sd 0
    rule = PilotRule()
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path / "same").items()]
    assert stats[0].sd == 0.0 and stats[0].seeds == 5
    _pilot(tmp_path / "nan", {"A": [math.nan, -0.01, -0.02]}, {"A": 20})  # a diverged run
    stats = [setting_stats(n, r, rule, "prenorm", "block") for n, r in load_groups(tmp_path / "nan").items()]
    assert not stats[0].finite and choose(stats, rule).setting is None
    with pytest.raises(FileNotFoundError, match="no runs/ folder"):
        pilot_report(tmp_path / "empty")


def test_pilot_report_regenerates_byte_for_byte(tmp_path, capsys):
    _pilot(tmp_path, DIFFS, {"A": 20, "B": 40})
    main(["pilot", str(tmp_path)])
    assert "report.md" in capsys.readouterr().out
    first = {p.name: p.read_bytes() for p in (tmp_path / "report.md", tmp_path / "paired_differences.png")}
    main(["pilot", str(tmp_path)])
    assert first == {
        p.name: p.read_bytes() for p in (tmp_path / "report.md", tmp_path / "paired_differences.png")
    }


def test_lr_sweep_report(tmp_path):
    # prenorm is best at 0.003, block at 0.006 (the grid's edge); block beats prenorm at both rates
    losses = {
        ("prenorm", 0.0015): 5.10, ("prenorm", 0.003): 5.00, ("prenorm", 0.006): 5.05,
        ("block", 0.0015): 5.08, ("block", 0.003): 4.98, ("block", 0.006): 4.95,
    }  # fmt: skip
    for (variant, lr), loss in losses.items():
        for seed in range(3):
            write_run(tmp_path / "runs" / f"lr{lr:g}", variant, seed, loss + 0.01 * seed, lr=lr)
    text = lr_sweep_report(tmp_path).read_text()
    assert "| 0.003 | **5.0100 ± 0.0100** | 4.9900 ± 0.0100 |" in text
    assert "| 0.006 | 5.0600 ± 0.0100 | **4.9600 ± 0.0100** |" in text
    assert "**On the edge of the grid:** block" in text
    # own best: block@0.006 − prenorm@0.003 = −0.05; at prenorm's best: block@0.003 − prenorm@0.003 = −0.02
    assert (
        "| block | 0.006 | 4.9600 ± 0.0100 | -0.0500 [-0.0500, -0.0500] | 4.9900 ± 0.0100 | -0.0200 [" in text
    )
    assert "| prenorm | 0.003 | 5.0100 ± 0.0100 | (baseline) |" in text
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0


def test_lr_sweep_divergence_and_the_rates_to_add(tmp_path, capsys):
    for lr, (pre, blk) in {0.0015: (5.10, 5.08), 0.003: (5.05, 5.00), 0.006: (5.00, None)}.items():
        group = tmp_path / "runs" / f"lr{lr:g}"
        for seed in range(2):
            write_run(group, "prenorm", seed, pre + 0.01 * seed, lr=lr)
            if blk is not None:
                write_run(group, "block", seed, blk + 0.01 * seed, lr=lr)
        if blk is None:  # what experiments/lr_sweep/run.sh leaves when a compare stops on a NaN loss
            (group / "block.diverged").write_text(json.dumps({"variant": "block", "lr": lr, "error": "nan"}))
    text = lr_sweep_report(tmp_path).read_text()
    assert "| 0.006 | **5.0050 ± 0.0071** | diverged |" in text
    assert "| block | 0.003 | 5.0050 ± 0.0071 | +0.0000 [" in text  # own best 0.003 vs prenorm's best 0.006
    assert "| diverged | n/a |" in text  # block at prenorm's best rate
    main(["lr-sweep", str(tmp_path), "--best"])
    assert capsys.readouterr().out.splitlines() == ["prenorm 0.006", "block 0.003"]
    main(["lr-sweep", str(tmp_path), "--next", "0.0015,0.003,0.006"])
    assert capsys.readouterr().out.splitlines() == ["0.012"]  # prenorm's best is the top edge
    # at most two steps of 2x beyond the base grid: 0.006 is already two above a grid ending at 0.0015
    assert load_sweep(tmp_path).next_rates([0.000375, 0.00075, 0.0015]) == []


def test_lr_sweep_best_rate_uses_the_seeds_every_rate_has(tmp_path):
    for lr, loss in {0.0015: 5.10, 0.003: 5.00, 0.006: 5.02}.items():
        for seed in range(3):
            write_run(tmp_path / "runs" / f"lr{lr:g}", "prenorm", seed, loss + 0.01 * seed, lr=lr)
    for seed in range(3, 6):  # extra seeds at 0.006, all low: they do not move the choice to 0.006
        write_run(tmp_path / "runs" / "lr0.006", "prenorm", seed, 4.0, lr=0.006)
    assert load_sweep(tmp_path).best("prenorm") == 0.003
