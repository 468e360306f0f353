"""Plots of the diagnostics: depth profiles overlaid across variants, and depth-attention heatmaps."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from attnres.analysis.plots import VariantStyle, legend_outside, save_figure, variant_styles  # noqa: E402

_PROFILES = [
    ("output_rms", "output RMS (Fig. 5b)"),
    ("input_rms", "RMS of the hidden state it receives"),
    ("grad_norm", "parameter gradient norm (Fig. 5c)"),
]


def mean_profile(diags: list[dict[str, Any]], key: str) -> np.ndarray:
    """Per-sublayer ``key`` averaged over runs (seeds) ``[L]``."""
    return np.mean([[s[key] for s in d["sublayers"]] for d in diags], axis=0)


def plot_profiles(
    runs: dict[str, list[dict[str, Any]]],
    path: str | Path,
    title: str = "",
    styles: Mapping[str, VariantStyle] | None = None,
) -> Path:
    """Per-sublayer magnitudes and gradient norms, one line per variant (mean over its seeds), in
    ``styles`` (default: :func:`variant_styles` of ``runs``)."""
    styles = styles or variant_styles(runs)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for variant, diags in runs.items():
        for ax, (key, _) in zip(axes, _PROFILES, strict=True):
            y = mean_profile(diags, key)
            ax.plot(np.arange(len(y)), y, **styles[variant].kw(), marker="o", ms=3, label=variant)
    for ax, (_, label) in zip(axes, _PROFILES, strict=True):
        ax.set(xlabel="sublayer (even: attention, odd: MLP)", ylabel=label, yscale="log", title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    legend_outside(axes[-1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_entropy(
    runs: dict[str, list[dict[str, Any]]], path: str | Path, styles: Mapping[str, VariantStyle] | None = None
) -> Path | None:
    """Entropy of each read relative to uniform (``H / log N``), per read site, in ``styles``;
    ``None`` if no variant has reads."""
    styles = styles or variant_styles(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for variant, diags in runs.items():
        reads = [d["reads"] for d in diags if d["reads"]]
        if not reads:
            continue
        sites = [r["site"] for r in reads[0] if r["max_entropy"] > 0]
        rel = [
            np.mean([rs[s]["entropy"] / rs[s]["max_entropy"] for rs in reads]) for s in sites
        ]  # the first read has one source: no entropy to speak of
        ax.plot(sites, rel, **styles[variant].kw(), marker="o", ms=3, label=variant)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="read site (sublayer input; last = final read)", ylabel="entropy / log(sources)",
           title="how spread each depth read is (1 = uniform)", ylim=(0, 1.05))  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def depth_weight_matrix(diags: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """Read sites × sources ``[L+1, S]`` of weights averaged over tokens and seeds, NaN where a
    read does not see a source, plus the column labels.

    When every source is a single sublayer output or the embedding (Full, SWA, hierarchical), the
    columns are absolute (``emb, s0, s1, …``); otherwise (Block) column ``j`` is block ``j``
    (``b0`` is the embedding; the last one a read sees is the live partial sum).
    """
    reads = diags[0]["reads"]
    absolute = all(re.fullmatch(r"emb|s\d+", src) for r in reads for src in r["sources"])
    L = diags[0]["n_sublayers"]
    n_cols = L + 1 if absolute else max(len(r["sources"]) for r in reads)
    mat = np.full((len(reads), n_cols), np.nan)
    for i, r in enumerate(reads):
        w = np.mean([d["reads"][i]["weights"] for d in diags], axis=0)
        cols = [0 if s == "emb" else int(s[1:]) + 1 for s in r["sources"]] if absolute else range(len(w))
        mat[i, list(cols)] = w
    labels = (
        ["emb"] + [f"s{i}" for i in range(L)]
        if absolute
        else ["b0=emb"] + [f"b{j}" for j in range(1, n_cols)]
    )
    return mat, labels


def plot_depth_weights(diags: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Heatmaps of depth-attention weights (paper Fig. 8): pre-attention reads, pre-MLP reads and
    the final read, rows = Transformer layer, columns = sources."""
    mat, labels = depth_weight_matrix(diags)
    attn, mlp, final = mat[0:-1:2], mat[1:-1:2], mat[-1:]
    n_cols = mat.shape[1]
    fig, axes = plt.subplots(
        3, 1, figsize=(max(6, 0.45 * n_cols + 2), 0.45 * (2 * len(attn) + 1) + 3.2),
        gridspec_kw={"height_ratios": [len(attn), len(mlp), 1.4]},
    )  # fmt: skip
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: the read does not see it
    vmax = float(np.nanmax(mat))
    for ax, block, name in zip(
        axes, (attn, mlp, final), ("pre-attention reads", "pre-MLP reads", "final read"), strict=True
    ):
        im = ax.imshow(np.ma.masked_invalid(block), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(n_cols), labels if ax is axes[-1] else [], rotation=90, fontsize=8)
        rows = [f"layer {i}" for i in range(len(block))] if name != "final read" else ["final"]
        ax.set_yticks(range(len(block)), rows, fontsize=8)
        if n_cols * len(block) <= 400:
            for (r, c), v in np.ndenumerate(block):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 * vmax else "black")  # fmt: skip
    blocks = labels[0] == "b0=emb"
    axes[-1].set_xlabel(
        "source: block j (the last one a read sees is the live partial sum)" if blocks
        else "source: embedding, then the output of sublayer i"
    )  # fmt: skip
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="weight (mean over tokens)")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=110)
