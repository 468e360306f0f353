"""``attnres report DIR``: turn a run directory or a compare directory into ``report.md`` + PNGs.

The report uses what each run directory still holds, so it also works on results committed
without their checkpoints or logs: ``result.json`` gives the summary table, ``metrics.jsonl`` the
loss curves (without any, the final losses of ``result.json`` are plotted instead),
``diagnostics.json`` the profiles and heatmaps, and ``config.json`` the setup line. A hand-written
``notes.md`` in the directory is copied under the title. The same files give the same report,
byte for byte, PNGs included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attnres.analysis.diagnostics import load_diagnostics
from attnres.analysis.plots import (
    METRICS_FILE,
    VariantStyle,
    plot_final_losses,
    plot_loss_curves,
    variant_styles,
)
from attnres.analysis.profiles import plot_depth_weights, plot_entropy, plot_profiles
from attnres.analysis.stats import format_difference, format_mean_std, variant_stats

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
NOTES_FILE = "notes.md"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _find_runs(root: Path) -> dict[str, list[Path]]:
    """``{variant: [run dirs by seed]}`` for a compare directory (subdirs with ``result.json``,
    directly or under ``runs/`` as in the committed results) or for a single run directory
    (``result.json``, ``metrics.jsonl`` or ``config.json`` in it)."""
    if any((root / name).exists() for name in (RESULT_FILE, METRICS_FILE, CONFIG_FILE)):
        named = _read_json(root / RESULT_FILE) or _read_json(root / CONFIG_FILE)["model"]["residual"]
        return {named["variant"]: [root]}
    runs: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted([*root.glob(f"*/{RESULT_FILE}"), *root.glob(f"runs/*/{RESULT_FILE}")]):
        r = json.loads(path.read_text())
        runs.setdefault(r["variant"], []).append((r["seed"], path.parent))
    if not runs:
        raise FileNotFoundError(
            f"{root} is neither a run directory (metrics.jsonl) nor a compare directory (*/result.json); "
            "point attnres report at the --out of attnres train or attnres compare"
        )
    order = ["prenorm", *sorted(v for v in runs if v != "prenorm")]
    return {v: [d for _, d in sorted(runs[v])] for v in order if v in runs}


def _setup(runs: dict[str, list[Path]]) -> str | None:
    """The shared setup in words, from the first run with a ``config.json`` (``None`` if none has one)."""
    cfg = next((c for dirs in runs.values() for d in dirs if (c := _read_json(d / CONFIG_FILE))), None)
    if cfg is None:
        return None
    m = cfg["model"]
    return (
        f"{cfg['data']['corpus']} ({cfg['data']['tokenizer']} tokens), d = {m['d_model']}, "
        f"{m['n_layers']} layers = {2 * m['n_layers']} sublayers, seq_len {m['seq_len']}, "
        f"{cfg['train']['steps']} steps of "
        f"{cfg['train']['batch_size']} sequences, optimiser {cfg['optim']['name']} lr {cfg['optim']['lr']}"
    )


def _table(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    out = [
        f"| variant | seeds | val loss (mean ± std) | vs {baseline}: paired diff [95% t CI] "
        "| tokens/run | FLOPs/run | params | tokens/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = format_difference(row, baseline)
        loss = format_mean_std(row["val_loss_mean"], row["val_loss_std"], row["seeds"])
        out.append(
            f"| {row['variant']} | {row['seeds']} | {loss} "
            f"| {delta} | {row['train_tokens']:.3g} | {row['train_flops']:.3g} | {row['n_params']:,} "
            f"| {row['tokens_per_s']:,.0f} |"
        )
    return out


def _loss_section(
    root: Path,
    runs: dict[str, list[Path]],
    results: dict[str, list[dict[str, Any]]],
    baseline: str,
    styles: dict[str, VariantStyle],
    title: str,
) -> list[str]:
    """Loss curves of the runs with ``metrics.jsonl``; without any, the final losses of ``result.json``."""
    logged = {v: [d for d in dirs if (d / METRICS_FILE).exists()] for v, dirs in runs.items()}
    logged = {v: dirs for v, dirs in logged.items() if dirs}
    unlogged = [d.name for dirs in runs.values() for d in dirs if not (d / METRICS_FILE).exists()]
    if logged:
        plot_loss_curves(logged, root / "loss_curves.png", title=title, styles=styles)
        lines = [
            "## Loss curves",
            "",
            "![loss curves](loss_curves.png)",
            "",
            "Each line is the mean over a variant's seeds, the band their min–max; the right panel "
            "zooms on the last 30% of training (shaded on the others).",
            "",
        ]
        if unlogged:
            lines += [f"Not drawn (no `{METRICS_FILE}`): {', '.join(unlogged)}.", ""]
        return lines
    if not any(results.values()):
        return []
    plot_final_losses(
        {v: rs for v, rs in results.items() if rs}, root / "final_losses.png", baseline, styles=styles
    )
    return [
        "## Final losses",
        "",
        f"These runs keep no `{METRICS_FILE}`, so there are no loss curves; the losses at the end of "
        f"training from each run's `{RESULT_FILE}` (train loss: the last step's batch).",
        "",
        "![final losses](final_losses.png)",
        "",
    ]


def write_report(run_or_compare_dir: str | Path, baseline: str = "prenorm") -> Path:
    """Write ``report.md`` and its plots into the directory; return the report's path.

    Plots: loss curves (or final losses), per-sublayer magnitude and gradient profiles overlaid
    across variants (mean over seeds), read entropy, and one depth-attention heatmap per variant
    that has reads. A variant has the same colour and line style in every plot.
    """
    root = Path(run_or_compare_dir)
    runs = _find_runs(root)
    styles = variant_styles(runs)
    setup = _setup(runs)
    lines = [f"# Report: {root.name}", ""]
    if (root / NOTES_FILE).exists():
        lines += [(root / NOTES_FILE).read_text().strip(), ""]
    if setup:
        lines += [f"Setup: {setup}.", ""]

    results = {v: [r for d in dirs if (r := _read_json(d / RESULT_FILE))] for v, dirs in runs.items()}
    flat = [r for rs in results.values() for r in rs]
    if flat:
        lines += ["## Summary", "", *_table(variant_stats(flat, baseline), baseline), ""]
        lines += [
            "Validation loss at the end of training. The paired difference subtracts the baseline run "
            "with the same seed (same initial weights of the shared modules and the same data order); "
            "the interval is a Student-t 95% interval over seeds. FLOPs: 6 × non-embedding parameters "
            "× tokens, plus attention scores.",
            "",
        ]
    title = setup.split(", optimiser")[0] if setup else ""
    lines += _loss_section(root, runs, results, baseline, styles, title)

    diags = {v: [x for x in (load_diagnostics(d) for d in dirs) if x is not None] for v, dirs in runs.items()}
    diags = {v: ds for v, ds in diags.items() if ds}
    if diags:
        plot_profiles(
            diags,
            root / "profiles.png",
            title="per sublayer, on a held-out batch after training",
            styles=styles,
        )
        lines += [
            "## Training dynamics (paper Fig. 5)",
            "",
            "Per sublayer, on one held-out batch after training, mean over seeds: the RMS of its "
            "output, the RMS of the hidden state it receives, and the norm of its parameters' gradient.",
            "",
            "![profiles](profiles.png)",
            "",
        ]
        if plot_entropy(diags, root / "read_entropy.png", styles=styles):
            lines += ["### Read entropy", "", "![read entropy](read_entropy.png)", ""]
        heat = [v for v, ds in diags.items() if ds[0]["reads"]]
        if heat:
            lines += ["## Depth-attention weights (paper Fig. 8)", ""]
            for v in heat:
                name = f"depth_weights_{v}.png"
                plot_depth_weights(
                    diags[v], root / name, title=f"{v}: weights averaged over tokens and seeds"
                )
                lines += [f"### {v}", "", f"![{v} depth weights]({name})", ""]
    else:
        lines += ["No `diagnostics.json` in these runs (they predate it); no profiles or heatmaps.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
