"""Plots of run metrics (matplotlib, headless)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(runs: dict[str, list[Path]], path: str | Path, title: str = "") -> Path:
    """Train (smoothed) and validation loss vs step, one colour per variant, one line per seed."""
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    # tab10 repeats after 10 variants (there are 11 with `--variants all`); tab20 does not.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(runs) <= 10 else plt.cm.tab20.colors
    for i, (variant, dirs) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        for j, d in enumerate(dirs):
            recs = read_metrics(d)
            steps = [r["step"] for r in recs]
            ax_train.plot(
                steps,
                _smooth([r["loss"] for r in recs], 20),
                color=color,
                alpha=0.8,
                label=variant if j == 0 else None,
            )
            val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            if val:
                ax_val.plot(
                    *zip(*val, strict=True),
                    marker="o",
                    color=color,
                    alpha=0.8,
                    label=variant if j == 0 else None,
                )
    ax_train.set(xlabel="step", ylabel="train loss (20-step mean)", title="training loss")
    ax_val.set(xlabel="step", ylabel="validation loss", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Run dirs grouped by the variant recorded in their ``result.json``."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for d in run_dirs:
        groups[json.loads((d / "result.json").read_text())["variant"]].append(d)
    return dict(groups)
