"""Scaling-law fits: ``L(C) = E + A·C^(−α)``, a variant's compute multiplier, and its bootstrap interval.

The fit is variable projection: for a fixed exponent ``α`` the model is linear in ``(E, A)``, so
ordinary least squares gives them exactly, and only ``α`` is searched (a log-spaced grid, then a
golden-section refinement). No starting point to guess, no optimiser that can wander off: a fit
that does not describe a falling curve (``A ≤ 0``, or the best ``α`` on the edge of its range) is
reported as not converged instead of returned as if it meant something.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA_RANGE = (1e-3, 3.0)  # exponents searched; compute-scaling exponents of LMs are ~0.05-0.5


class FitError(ValueError):
    """The points do not determine a falling power law (too few, or no decrease with compute)."""


@dataclass(frozen=True)
class PowerLaw:
    """``L(C) = E + A·C^(−alpha)``, fitted to ``n`` points with residual RMS ``rms``."""

    E: float
    A: float
    alpha: float
    rms: float
    n: int

    def loss(self, compute: float) -> float:
        """The fitted loss at ``compute``."""
        return self.E + self.A * compute**-self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which the fit reaches ``loss`` (``inf`` when ``loss <= E``: never)."""
        if loss <= self.E:
            return math.inf
        return ((loss - self.E) / self.A) ** (-1.0 / self.alpha)


def _linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y ≈ e + a·x``: ``(e, a, sum of squared residuals)``."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    a = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx if sxx > 0 else 0.0
    e = my - a * mx
    return e, a, sum((yi - e - a * xi) ** 2 for xi, yi in zip(x, y, strict=True))


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Fit ``L(C) = E + A·C^(−α)`` to points ``(compute[i], loss[i])``.

    Raises:
        FitError: fewer than 3 points or distinct compute values, a non-positive compute, or points
            that no falling power law fits (``A <= 0``, or the best ``α`` at the edge of
            :data:`ALPHA_RANGE`: the data ask for a curve flatter or steeper than any LM's).
    """
    if len(compute) != len(loss):
        raise ValueError(f"{len(compute)} compute values but {len(loss)} losses")
    if len(set(compute)) < 3:
        raise FitError(
            f"a power law with an offset needs >= 3 distinct compute values, got {len(set(compute))}"
        )
    if min(compute) <= 0 or not all(math.isfinite(v) for v in [*compute, *loss]):
        raise FitError("compute must be positive and every value finite")
    scale = math.exp(statistics.fmean(math.log(c) for c in compute))  # conditioning: C / geometric mean
    u = [c / scale for c in compute]

    def sse(alpha: float) -> float:
        return _linear_fit([ui**-alpha for ui in u], loss)[2]

    lo, hi = (math.log(a) for a in ALPHA_RANGE)
    grid = [math.exp(lo + (hi - lo) * i / 400) for i in range(401)]
    best = min(range(len(grid)), key=lambda i: sse(grid[i]))
    if best in (0, len(grid) - 1):
        raise FitError(f"no falling power law fits: the best exponent is at the edge of {ALPHA_RANGE}")
    a, b = grid[best - 1], grid[best + 1]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # golden-section search on the bracket around the best grid point
        c, d = b - golden * (b - a), a + golden * (b - a)
        a, b = (a, d) if sse(c) < sse(d) else (c, b)
    alpha = (a + b) / 2
    e, amp, residual = _linear_fit([ui**-alpha for ui in u], loss)
    if amp <= 0:
        raise FitError("no falling power law fits: the loss does not decrease with compute")
    return PowerLaw(E=e, A=amp * scale**alpha, alpha=alpha, rms=math.sqrt(residual / len(loss)), n=len(loss))


def compute_multiplier(baseline: PowerLaw, variant: PowerLaw, compute: float) -> float:
    """How much compute the baseline needs to reach the variant's loss at ``compute``, as a ratio.

    ``1.25`` means the variant at ``compute`` matches the baseline at ``1.25 × compute`` (the paper's
    figure for Block AttnRes); ``inf`` means the baseline's fit never gets that low.
    """
    return baseline.compute_for(variant.loss(compute)) / compute


@dataclass(frozen=True)
class BootstrapInterval:
    """A point estimate and its percentile bootstrap interval over ``n`` resamples (``failed`` dropped)."""

    estimate: float
    low: float
    high: float
    n: int
    failed: int


def bootstrap_multiplier(
    baseline: Mapping[float, Sequence[float]],
    variant: Mapping[float, Sequence[float]],
    compute: float,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapInterval:
    """:func:`compute_multiplier` at ``compute`` with a percentile bootstrap interval over seeds.

    ``baseline`` and ``variant`` map each model size's compute to its per-seed final losses. Each
    resample draws, per size and per variant independently, as many seeds as there are with
    replacement, fits both power laws to the resampled means and records the multiplier. Resamples
    whose fit fails are counted in ``failed`` and left out (many failures mean the ladder is too
    short or too noisy to say anything).
    """

    def fit(points: Mapping[float, Sequence[float]], rng: random.Random | None) -> PowerLaw:
        xs = sorted(points)
        means = [
            statistics.fmean(points[x] if rng is None else rng.choices(list(points[x]), k=len(points[x])))
            for x in xs
        ]
        return fit_power_law(xs, means)

    estimate = compute_multiplier(fit(baseline, None), fit(variant, None), compute)
    rng, draws, failed = random.Random(seed), [], 0
    for _ in range(resamples):
        try:
            draws.append(compute_multiplier(fit(baseline, rng), fit(variant, rng), compute))
        except FitError:
            failed += 1
    if not draws:
        raise FitError("every bootstrap resample failed to fit")
    draws.sort()
    tail = (1 - level) / 2
    pick = lambda q: draws[min(len(draws) - 1, int(q * len(draws)))]  # noqa: E731
    return BootstrapInterval(estimate, pick(tail), pick(1 - tail), len(draws), failed)
