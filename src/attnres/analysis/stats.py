"""Seed statistics for comparisons: mean ± std, and paired differences with a t confidence interval."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# two-sided 95% quantiles of Student's t, by degrees of freedom (1 … 30); 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]  # fmt: skip


def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    return _T95[df - 1] if df <= len(_T95) else 1.96


@dataclass(frozen=True)
class PairedDiff:
    """``mean(a - b)`` over matched seeds, its 95% t interval ``[low, high]`` and ``n`` pairs.

    With one pair the interval is unknown (``nan``): one seed cannot say how much seeds vary.
    """

    mean: float
    low: float
    high: float
    n: int


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for a single value: one seed shows no spread)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def format_mean_std(mean: float, std: float, n: int) -> str:
    """``"4.7338 ± 0.0123"`` over ``n`` seeds; ``"4.7338 (1 seed)"`` when there is one."""
    return f"{mean:.4f} (1 seed)" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def paired_difference(a: dict[int, float], b: dict[int, float]) -> PairedDiff | None:
    """``a - b`` paired by seed (the keys); ``None`` when no seed is in both."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDiff(mean, math.nan, math.nan, 1)
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDiff(mean, mean - half, mean + half, len(diffs))


def variant_stats(results: Sequence[Mapping[str, Any]], baseline: str = "prenorm") -> list[dict]:
    """Per variant: seeds, mean ± std validation loss, the paired difference to ``baseline``
    (same seeds) with its 95% t interval, and per-run tokens, FLOPs, parameters and throughput.

    ``results`` are finished runs as their ``result.json`` records them (``variant``, ``seed``,
    ``final_val_loss``, ``train_tokens``, ``train_flops``, ``n_params``, ``tokens_per_s``, ``seconds``).
    """
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    base = {r["seed"]: r["final_val_loss"] for r in by_variant.get(baseline, [])}
    rows = []
    for variant, rs in by_variant.items():
        mean, std = mean_std([r["final_val_loss"] for r in rs])
        diff = paired_difference({r["seed"]: r["final_val_loss"] for r in rs}, base) if base else None
        rows.append({
            "variant": variant, "seeds": len(rs), "val_loss_mean": mean, "val_loss_std": std,
            "diff_vs_" + baseline: None if diff is None else dataclasses.asdict(diff),
            "train_tokens": rs[0]["train_tokens"], "train_flops": rs[0]["train_flops"],
            "n_params": rs[0]["n_params"],
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
            "seconds": statistics.fmean(r["seconds"] for r in rs),
        })  # fmt: skip
    return rows


def format_difference(row: Mapping[str, Any], baseline: str = "prenorm") -> str:
    """A :func:`variant_stats` row's paired difference to ``baseline`` as text, with its 95% CI."""
    d = row.get("diff_vs_" + baseline)
    if row["variant"] == baseline:
        return "(baseline)"
    if d is None:
        return "n/a"
    if d["n"] < 2:
        return f"{d['mean']:+.4f} (1 seed, no CI)"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], n = {d['n']}"
