"""Seed statistics for comparisons: mean ± std, and paired differences with a t confidence interval."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (continued fraction, modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom, to ~1e-12 (bisection)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    return invert_cdf(lambda x: t_cdf(x, df), p)


def invert_cdf(cdf: Callable[[float], float], p: float, high: float = 1.0) -> float:
    """The ``x >= 0`` with ``cdf(x) = p``, to a relative ~1e-13, by bisection.

    ``cdf`` is nondecreasing on ``[0, inf)`` with ``cdf(0) <= p``; ``high`` is a first upper
    guess, doubled until ``cdf(high) >= p``.
    """
    low = 0.0
    while cdf(high) < p:
        high *= 2.0
    for _ in range(300):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df >= 1`` degrees of freedom (exact at every df)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    return t_quantile(0.975, df)


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
    """``a - b`` paired by seed (the keys); ``None`` when no seed is in both.

    A non-finite loss (a diverged run) makes the mean and the interval NaN rather than a number
    (``statistics.stdev`` would raise on it).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    if not all(math.isfinite(x) for x in diffs):
        return PairedDiff(math.nan, math.nan, math.nan, len(diffs))
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
