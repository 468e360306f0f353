"""``attnres report DIR``: turn a run directory or a compare directory into ``report.md`` + PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attnres.analysis.diagnostics import load_diagnostics
from attnres.analysis.stats import format_mean_std


def _find_runs(root: Path) -> dict[str, list[Path]]:
    """``{variant: [run dirs by seed]}`` for a compare directory (subdirs with ``result.json``) or
    for a single run directory."""
    if (root / "metrics.jsonl").exists():
        variant = json.loads((root / "config.json").read_text())["model"]["residual"]["variant"]
        return {variant: [root]}
    runs: dict[str, list[tuple[int, Path]]] = {}
    for result in sorted(root.glob("*/result.json")):
        r = json.loads(result.read_text())
        runs.setdefault(r["variant"], []).append((r["seed"], result.parent))
    if not runs:
        raise FileNotFoundError(
            f"{root} is neither a run directory (metrics.jsonl) nor a compare directory (*/result.json); "
            "point attnres report at the --out of attnres train or attnres compare"
        )
    order = ["prenorm", *sorted(v for v in runs if v != "prenorm")]
    return {v: [d for _, d in sorted(runs[v])] for v in order if v in runs}


def _table(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    from attnres.train.compare import format_difference

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


def write_report(run_or_compare_dir: str | Path, baseline: str = "prenorm") -> Path:
    """Write ``report.md`` and its plots into the directory; return the report's path.

    Plots: loss curves, per-sublayer magnitude and gradient profiles overlaid across variants
    (mean over seeds), read entropy, and one depth-attention heatmap per variant that has reads.
    """
    from attnres.analysis.plots import plot_loss_curves
    from attnres.analysis.profiles import plot_depth_weights, plot_entropy, plot_profiles
    from attnres.train.compare import variant_stats
    from attnres.train.loop import RunResult

    root = Path(run_or_compare_dir)
    runs = _find_runs(root)
    cfg = json.loads((next(iter(runs.values()))[0] / "config.json").read_text())
    m = cfg["model"]
    setup = (
        f"{cfg['data']['corpus']} ({cfg['data']['tokenizer']} tokens), d = {m['d_model']}, "
        f"{m['n_layers']} layers = {2 * m['n_layers']} sublayers, seq_len {m['seq_len']}, "
        f"{cfg['train']['steps']} steps of "
        f"{cfg['train']['batch_size']} sequences, optimiser {cfg['optim']['name']} lr {cfg['optim']['lr']}"
    )
    lines = [f"# Report: {root.name}", "", f"Setup: {setup}.", ""]

    results = [
        RunResult(**json.loads((d / "result.json").read_text()))
        for dirs in runs.values()
        for d in dirs
        if (d / "result.json").exists()
    ]
    if results:
        lines += ["## Summary", "", *_table(variant_stats(results, baseline), baseline), ""]
        lines += [
            "Validation loss at the end of training. The paired difference subtracts the baseline run "
            "with the same seed (same initial weights of the shared modules and the same data order); "
            "the interval is a Student-t 95% interval over seeds. FLOPs: 6 × non-embedding parameters "
            "× tokens, plus attention scores.",
            "",
        ]
    plot_loss_curves(runs, root / "loss_curves.png", title=setup.split(", optimiser")[0])
    lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]

    diags = {v: [x for x in (load_diagnostics(d) for d in dirs) if x is not None] for v, dirs in runs.items()}
    diags = {v: ds for v, ds in diags.items() if ds}
    if diags:
        plot_profiles(diags, root / "profiles.png", title="per sublayer, on a held-out batch after training")
        lines += [
            "## Training dynamics (paper Fig. 5)",
            "",
            "Per sublayer, on one held-out batch after training, mean over seeds: the RMS of its "
            "output, the RMS of the hidden state it receives, and the norm of its parameters' gradient.",
            "",
            "![profiles](profiles.png)",
            "",
        ]
        if plot_entropy(diags, root / "read_entropy.png"):
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
