"""Train several residual variants on identical data and seeds, and summarise them side by side."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from attnres.residuals import variant_names
from attnres.train.config import TrainConfig
from attnres.train.loop import RunResult, train


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def parse_variants(spec: str) -> list[str]:
    """``"prenorm,block"`` or ``"all"`` -> variant names; unknown names list the valid ones."""
    names = variant_names() if spec == "all" else [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in variant_names()]
    if unknown or not names:
        raise ValueError(
            f"unknown variant(s) {unknown or spec!r}; valid variants: {', '.join(variant_names())}"
        )
    return names


def compare(
    base: TrainConfig,
    variants: list[str],
    seeds: int,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Train every (variant, seed) into ``out_dir/<variant>-s<seed>``; finished runs are reused.

    All runs share ``base`` except ``model.residual.variant`` and ``train.seed``; the data order
    (``train.data_seed``) is the same for every run, so differences come from the variant alone.
    Writes ``summary.json`` and ``loss_curves.png`` into ``out_dir`` and returns the results.
    """
    from attnres.analysis.plots import plot_loss_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    for variant in variants:
        for seed in range(seeds):
            run_dir = out / run_name(variant, seed)
            if (run_dir / "result.json").exists():
                log(f"{run_dir.name}: finished earlier, reusing its result")
                results.append(RunResult(**json.loads((run_dir / "result.json").read_text())))
                continue
            cfg = dataclasses.replace(
                base,
                model=dataclasses.replace(
                    base.model, residual=dataclasses.replace(base.model.residual, variant=variant)
                ),
                train=dataclasses.replace(base.train, seed=seed),
            )
            results.append(train(cfg, run_dir, resume=(run_dir / "checkpoint").exists(), log=log))
    (out / "summary.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    plot_loss_curves(
        {v: [out / run_name(v, s) for s in range(seeds)] for v in variants},
        out / "loss_curves.png",
        title=f"{base.data.corpus}, d={base.model.d_model}, {base.model.n_sublayers} sublayers, "
        f"{seeds} seed(s)",
    )
    return results


def summary_table(results: list[RunResult]) -> str:
    """A plain-text table: per variant the mean ± std final validation loss and throughput."""
    by_variant: dict[str, list[RunResult]] = {}
    for r in results:
        by_variant.setdefault(r.variant, []).append(r)
    base = by_variant.get("prenorm")
    base_loss = statistics.fmean(r.final_val_loss for r in base) if base else None
    head = (
        f"{'variant':<10} {'seeds':>5} {'val loss':>17} {'vs prenorm':>11} "
        f"{'tok/s':>8} {'params':>9} {'s/run':>7}"
    )
    lines = [head, "-" * len(head)]
    for variant, rs in by_variant.items():
        losses = [r.final_val_loss for r in rs]
        mean = statistics.fmean(losses)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        delta = f"{mean - base_loss:+.4f}" if base_loss is not None else "n/a"
        lines.append(
            f"{variant:<10} {len(rs):>5} {mean:>9.4f} ± {std:.4f} {delta:>11} "
            f"{statistics.fmean(r.tokens_per_s for r in rs):>8,.0f} {rs[0].n_params:>9,} "
            f"{statistics.fmean(r.seconds for r in rs):>7.1f}"
        )
    return "\n".join(lines)
