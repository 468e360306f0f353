"""Scaling-law fits on synthetic data with known answers, and their degenerate cases."""

from __future__ import annotations

import math
import random

import pytest

from attnres.analysis.scaling import (
    FitError,
    PowerLaw,
    bootstrap_multiplier,
    compute_multiplier,
    fit_power_law,
)

LADDER = [1e12, 3e12, 1e13, 3e13, 1e14]


def test_an_exact_power_law_is_recovered() -> None:
    truth = PowerLaw(E=1.7, A=310.0, alpha=0.21, rms=0.0, n=0)
    fit = fit_power_law(LADDER, [truth.loss(c) for c in LADDER])
    assert math.isclose(fit.E, 1.7, rel_tol=1e-6) and math.isclose(fit.alpha, 0.21, rel_tol=1e-6)
    assert math.isclose(fit.A, 310.0, rel_tol=1e-4)
    assert fit.rms < 1e-9 and fit.n == 5


def test_the_compute_multiplier_of_a_known_shift() -> None:
    base = PowerLaw(E=1.7, A=310.0, alpha=0.21, rms=0.0, n=0)
    # a variant whose curve is the baseline's at 1.25x the compute: L_v(C) = L_b(1.25 C)
    variant = PowerLaw(E=1.7, A=310.0 * 1.25**-0.21, alpha=0.21, rms=0.0, n=0)
    for c in LADDER:
        assert compute_multiplier(base, variant, c) == pytest.approx(1.25, rel=1e-12)
    assert compute_multiplier(base, base, 1e13) == pytest.approx(1.0, rel=1e-12)
    below_floor = PowerLaw(E=1.5, A=1.0, alpha=0.2, rms=0.0, n=0)  # lower than the baseline's E
    assert compute_multiplier(base, below_floor, 1e30) == math.inf


def test_degenerate_fits_are_refused() -> None:
    with pytest.raises(FitError, match=">= 3 distinct compute values"):
        fit_power_law([1e12, 1e13], [3.0, 2.5])
    with pytest.raises(FitError, match=">= 3 distinct"):
        fit_power_law([1e12, 1e12, 1e13, 1e13], [3.0, 3.1, 2.5, 2.4])
    with pytest.raises(FitError, match="does not decrease|edge"):  # loss rising with compute
        fit_power_law(LADDER, [2.0, 2.1, 2.2, 2.3, 2.4])
    with pytest.raises(FitError, match="edge"):  # flat: identical runs at every size
        fit_power_law(LADDER, [2.0] * 5)
    with pytest.raises(FitError, match="positive"):
        fit_power_law([0.0, 1.0, 2.0], [3.0, 2.0, 1.0])


def test_the_bootstrap_covers_the_truth_and_shrinks_with_seeds() -> None:
    base = PowerLaw(E=1.7, A=310.0, alpha=0.21, rms=0.0, n=0)
    variant = PowerLaw(E=1.7, A=310.0 * 1.25**-0.21, alpha=0.21, rms=0.0, n=0)
    rng = random.Random(1)

    def seeds(law: PowerLaw, k: int) -> dict[float, list[float]]:
        return {c: [law.loss(c) + rng.gauss(0, 0.003) for _ in range(k)] for c in LADDER}

    few = bootstrap_multiplier(seeds(base, 3), seeds(variant, 3), 1e14, resamples=300)
    many = bootstrap_multiplier(seeds(base, 12), seeds(variant, 12), 1e14, resamples=300)
    for interval in (few, many):
        assert interval.low <= 1.25 <= interval.high, interval
        assert interval.low <= interval.estimate <= interval.high
    assert many.high - many.low < few.high - few.low


def test_the_bootstrap_is_deterministic_and_one_seed_gives_no_spread() -> None:
    base = {c: [PowerLaw(1.7, 310.0, 0.21, 0.0, 0).loss(c)] for c in LADDER}
    variant = {c: [PowerLaw(1.7, 300.0, 0.21, 0.0, 0).loss(c)] for c in LADDER}
    a = bootstrap_multiplier(base, variant, 1e14, resamples=100, seed=3)
    assert a == bootstrap_multiplier(base, variant, 1e14, resamples=100, seed=3)
    assert a.low == a.high == pytest.approx(a.estimate)  # one seed per size: every resample is the same
    assert a.failed == 0
