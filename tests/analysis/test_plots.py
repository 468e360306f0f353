"""Loss-curve plots: one style per variant, seeds as a band, a zoom on the end of training, the
legend outside the axes, the same style for a variant in every plot of a report."""

from __future__ import annotations

import json
import math

import matplotlib.colors as mcolors
import pytest
from matplotlib.collections import PolyCollection

import attnres.analysis.plots as plots
import attnres.analysis.profiles as profiles
from attnres.analysis.plots import ZOOM_FRACTION, loss_curves_figure, variant_styles
from attnres.analysis.report import write_report

VARIANTS = ["prenorm", "block", "full", "mhc"]


def _synthetic_runs(root, variants=VARIANTS, seeds=2, steps=200, eval_every=20):
    """``{variant: [run dirs]}`` with a ``metrics.jsonl`` each: losses that fall to a plateau a
    variant-dependent height apart, the seeds a little apart, validation every ``eval_every``."""
    runs = {}
    for i, v in enumerate(variants):
        for s in range(seeds):
            d = root / f"{v}-s{s}"
            d.mkdir(parents=True)
            recs = []
            for t in range(1, steps + 1):
                loss = 4.0 + 0.1 * i + 0.01 * s + 3 * math.exp(-t / 20) + 0.02 * math.sin(t + i)
                recs.append(
                    {"step": t, "loss": loss} | ({"val_loss": loss + 0.1} if t % eval_every == 0 else {})
                )
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            runs.setdefault(v, []).append(d)
    return runs


def _lines(ax):
    """The labelled-or-not data lines of ``ax`` (not the grid)."""
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0]


def test_variant_styles_are_distinct_and_colour_blind_safe():
    names = [f"v{i}" for i in range(11)]
    styles = variant_styles(names)
    assert len({(s.color, s.linestyle) for s in styles.values()}) == 11
    assert len({styles[n].color for n in names[: len(plots.PALETTE)]}) == len(plots.PALETTE)
    assert {s.color for s in styles.values()} <= set(plots.PALETTE)


def test_one_mean_line_and_one_band_per_variant_in_its_own_colour(tmp_path):
    runs = _synthetic_runs(tmp_path)
    fig = loss_curves_figure(runs)
    train, val, zoom = fig.axes[:3]
    for ax in (train, val, zoom):
        lines = _lines(ax)
        assert len(lines) == len(VARIANTS)  # the mean, not one line per seed
        colors = [mcolors.to_hex(ln.get_color()) for ln in lines]
        assert len(set(colors)) == len(VARIANTS)
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == len(VARIANTS)
        assert [mcolors.to_hex(b.get_facecolor()[0], keep_alpha=False) for b in bands] == colors
    assert [t.get_text() for t in zoom.get_legend().get_texts()] == VARIANTS


def test_the_zoom_panel_shows_the_last_30_percent_with_fitted_y_limits(tmp_path):
    steps = 200
    fig = loss_curves_figure(_synthetic_runs(tmp_path, steps=steps))
    full, zoom = fig.axes[1], fig.axes[2]
    assert zoom.get_xlim() == pytest.approx(((1 - ZOOM_FRACTION) * steps, steps))
    assert "validation" in zoom.get_ylabel()  # validation loss when there are evaluations there
    lo, hi = zoom.get_ylim()
    shown = [
        y
        for ln in _lines(zoom)
        for x, y in zip(ln.get_xdata(), ln.get_ydata(), strict=True)
        if x >= 0.7 * steps
    ]
    assert lo <= min(shown) and max(shown) <= hi
    assert hi - lo < 1.25 * (max(shown) - min(shown))  # fitted to the end of training, not to its start
    assert hi - lo < 0.5 * (full.get_ylim()[1] - full.get_ylim()[0])


def test_the_zoom_panel_falls_back_to_train_loss_without_two_evaluations_there(tmp_path):
    fig = loss_curves_figure(_synthetic_runs(tmp_path, steps=200, eval_every=100))
    assert "train" in fig.axes[-1].get_ylabel()


def _assert_legend_right_of_every_axes(fig):
    fig.canvas.draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert len(legends) == 1
    x0 = legends[0].get_window_extent().x0
    assert all(x0 >= ax.get_window_extent().x1 for ax in fig.axes)


def test_the_legend_is_outside_the_axes(tmp_path):
    _assert_legend_right_of_every_axes(loss_curves_figure(_synthetic_runs(tmp_path)))


def test_a_variant_has_one_style_in_every_plot_of_a_report(tmp_path, monkeypatch, fake_run):
    """Loss curves, profiles and read entropy (which has only the variants with reads) agree."""
    figures = {}

    def keep(fig, path, dpi):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(profiles, "save_figure", keep)
    for v in ["prenorm", "mhc", "full"]:  # mhc has no depth reads: the entropy plot skips it
        fake_run(tmp_path / f"{v}-s0", v, 0, 2.0)
    write_report(tmp_path)
    seen: dict[str, set] = {}
    for name in ("loss_curves.png", "profiles.png", "read_entropy.png"):
        fig = figures[name]
        _assert_legend_right_of_every_axes(fig)
        for ax in fig.axes:
            for ln in _lines(ax):
                if not ln.get_label().startswith("_"):
                    seen.setdefault(ln.get_label(), set()).add(
                        (mcolors.to_hex(ln.get_color()), ln.get_linestyle())
                    )
    assert set(seen) == {"prenorm", "mhc", "full"}
    assert all(len(s) == 1 for s in seen.values()), seen
    assert len({next(iter(s)) for s in seen.values()}) == 3
