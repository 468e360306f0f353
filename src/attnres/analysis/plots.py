"""Plots of run metrics (matplotlib, headless), and what every plot of a report shares: one style
per variant, seeds drawn as a mean with a min–max band, the legend outside the axes, and PNGs
that are the same bytes every time they are drawn from the same data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

METRICS_FILE = "metrics.jsonl"

# Okabe & Ito's colour-blind-safe palette, yellow last (it is the faintest on white).
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
LINE_STYLES = ("-", "--", ":", "-.")
ZOOM_FRACTION = 0.3  # the zoom panel shows the last 30% of training


@dataclass(frozen=True)
class VariantStyle:
    """How one variant is drawn in every plot of a report."""

    color: str
    linestyle: str

    def kw(self) -> dict[str, str]:
        """Keyword arguments for ``Axes.plot``."""
        return {"color": self.color, "linestyle": self.linestyle}


def variant_styles(variants: Iterable[str]) -> dict[str, VariantStyle]:
    """One style per variant, by position: colour ``i % 8`` of :data:`PALETTE`, and a new line
    style each time the palette wraps, so no two variants look alike (up to 32 of them)."""
    return {
        v: VariantStyle(PALETTE[i % len(PALETTE)], LINE_STYLES[(i // len(PALETTE)) % len(LINE_STYLES)])
        for i, v in enumerate(variants)
    }


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Save ``fig`` as a PNG without the matplotlib version in its metadata (the same data gives the
    same bytes), trimmed to what is drawn (legends outside the axes included), and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def legend_outside(ax: Axes, labelled: Axes | None = None, title: str | None = None) -> None:
    """The legend of the lines labelled on ``labelled`` (default ``ax``), to the right of ``ax``
    (the rightmost axes), where it covers no line."""
    handles, labels = (labelled or ax).get_legend_handles_labels()
    ax.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9,
        title=title, title_fontsize=8,
    )  # fmt: skip


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


@dataclass(frozen=True)
class Band:
    """A quantity over seeds at the steps every seed has: mean, min and max ``[n_steps]``."""

    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def seed_band(series: list[Mapping[int, float]]) -> Band | None:
    """The mean and min–max over seeds of ``{step: value}`` series; ``None`` when no step is common."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return None
    y = np.array([[s[k] for k in common] for s in series], dtype=float)
    return Band(np.array(common, dtype=float), y.mean(0), y.min(0), y.max(0))


def loss_bands(run_dirs: list[Path], window: int = 20) -> tuple[Band | None, Band | None]:
    """Train loss (``window``-step running mean per seed) and validation loss over the seeds'
    ``metrics.jsonl``; a later record of a step replaces an earlier one."""
    train, val = [], []
    for d in run_dirs:
        recs = list({r["step"]: r for r in read_metrics(d)}.values())
        train.append(
            dict(zip([r["step"] for r in recs], _smooth([r["loss"] for r in recs], window), strict=True))
        )
        val.append({r["step"]: r["val_loss"] for r in recs if "val_loss" in r})
    return seed_band(train), seed_band(val) if all(val) else None


def _draw_band(ax: Axes, band: Band, style: VariantStyle, label: str | None, marker: str | None) -> None:
    ax.plot(band.steps, band.mean, **style.kw(), marker=marker, ms=3, lw=1.4, label=label)
    if len(band.steps) and not np.array_equal(band.low, band.high):
        ax.fill_between(band.steps, band.low, band.high, color=style.color, alpha=0.15, lw=0)


def _fit_ylim(ax: Axes, bands: list[Band], x0: float, x1: float) -> None:
    """y-limits that fit what the bands show between ``x0`` and ``x1`` (their points there and
    where their lines cross the edges), with a 5% margin."""
    values = []
    for b in bands:
        inside = (b.steps >= x0) & (b.steps <= x1)
        edges = [x for x in (x0, x1) if b.steps[0] <= x <= b.steps[-1]]
        for y in (b.low, b.high):
            values += [*y[inside], *np.interp(edges, b.steps, y)]
    if not values:
        return
    lo, hi = float(min(values)), float(max(values))
    pad = 0.05 * (hi - lo) or 0.01 * abs(hi) or 0.01
    ax.set_ylim(lo - pad, hi + pad)


def loss_curves_figure(
    runs: dict[str, list[Path]], title: str = "", styles: Mapping[str, VariantStyle] | None = None
) -> Figure:
    """Train loss, validation loss (when the runs have it) and a zoom on the last 30% of training
    (validation loss when two evaluations fall there, else train loss), one style per variant:
    the mean over its seeds, with their min–max as a band."""
    styles = styles or variant_styles(runs)
    bands = {v: loss_bands(dirs) for v, dirs in runs.items()}
    has_val = any(val is not None for _, val in bands.values())
    fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(17 if has_val else 12, 4.8))
    last = max((b.steps[-1] for pair in bands.values() for b in pair if b is not None), default=1.0)
    x0 = (1 - ZOOM_FRACTION) * last
    # validation loss once it is a curve there (two evaluations), else the (dense) train loss
    zoom_val = any(val is not None and (val.steps >= x0).sum() >= 2 for _, val in bands.values())
    zoomed = []
    for variant, (train, val) in bands.items():
        style = styles[variant]
        if train is not None:
            _draw_band(axes[0], train, style, variant, None)
        if has_val and val is not None:
            _draw_band(axes[1], val, style, None, "o")
        shown = val if zoom_val else train
        if shown is not None:
            _draw_band(axes[-1], shown, style, None, "o" if zoom_val else None)
            zoomed.append(shown)
    axes[0].set(xlabel="step", ylabel="train loss (20-step mean)", title="training loss")
    if has_val:
        axes[1].set(xlabel="step", ylabel="validation loss", title="validation loss")
    what = "validation" if zoom_val else "train"
    axes[-1].set(
        xlabel="step", ylabel=f"{what} loss", xlim=(x0, last),
        title=f"last {ZOOM_FRACTION:.0%} of training ({what} loss)",
    )  # fmt: skip
    _fit_ylim(axes[-1], zoomed, x0, last)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax is not axes[-1]:
            ax.axvspan(x0, last, color="0.5", alpha=0.08, lw=0)  # the zoomed window
    legend_outside(axes[-1], labelled=axes[0], title="mean over seeds,\nband: min–max")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_curves(
    runs: dict[str, list[Path]],
    path: str | Path,
    title: str = "",
    styles: Mapping[str, VariantStyle] | None = None,
) -> Path:
    """Write :func:`loss_curves_figure` of ``{variant: [run dirs with metrics.jsonl]}`` to ``path``."""
    return save_figure(loss_curves_figure(runs, title, styles), path, dpi=120)


def final_losses_figure(
    results: dict[str, list[Mapping[str, Any]]],
    baseline: str | None = None,
    styles: Mapping[str, VariantStyle] | None = None,
) -> Figure:
    """Final validation and train loss per variant from its runs' ``result.json`` (for runs whose
    ``metrics.jsonl`` is gone): each seed a dot, the mean a bar, the baseline's mean a line."""
    styles = styles or variant_styles(results)
    variants = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.38 * len(variants) + 1.6), sharey=True)
    for ax, key, name in zip(
        axes, ("final_val_loss", "final_train_loss"), ("validation", "train"), strict=True
    ):
        for y, v in enumerate(variants):
            xs = [r[key] for r in results[v]]
            color = styles[v].color
            ax.plot([min(xs), max(xs)], [y, y], **styles[v].kw(), lw=1.2)
            ax.plot(xs, [y] * len(xs), "o", mfc="none", color=color, ms=5)
            ax.plot([np.mean(xs)], [y], "|", color=color, ms=14, mew=2.5)
        if baseline in results:
            ax.axvline(np.mean([r[key] for r in results[baseline]]), color="0.4", ls="--", lw=0.8)
        ax.set(xlabel=f"{name} loss at the end of training", title=f"final {name} loss")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(variants)), variants)
    axes[0].invert_yaxis()
    dashed = f", dashed: {baseline} mean" if baseline in results else ""
    fig.suptitle(f"each seed ○, mean |{dashed}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_final_losses(
    results: dict[str, list[Mapping[str, Any]]],
    path: str | Path,
    baseline: str | None = None,
    styles: Mapping[str, VariantStyle] | None = None,
) -> Path:
    """Write :func:`final_losses_figure` to ``path``."""
    return save_figure(final_losses_figure(results, baseline, styles), path, dpi=120)
