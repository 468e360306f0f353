"""Seed statistics."""

from __future__ import annotations

import math

import pytest

from attnres.analysis.stats import format_mean_std, mean_std, paired_difference, t95, t_quantile


def test_paired_difference_t_interval():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 0.5, 1: 1.0, 2: 2.5, 7: 9.0}  # seed 7 has no pair
    d = paired_difference(a, b)
    diffs = [0.5, 1.0, 0.5]
    sd = math.sqrt(sum((x - 2 / 3) ** 2 for x in diffs) / 2)
    assert d.n == 3 and math.isclose(d.mean, 2 / 3)
    assert math.isclose(d.high - d.mean, 4.302652730 * sd / math.sqrt(3), rel_tol=1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_diverged_run_makes_the_difference_nan_not_an_error(bad: float) -> None:
    d = paired_difference({0: 1.0, 1: bad, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.5})
    assert d.n == 3 and math.isnan(d.mean) and math.isnan(d.low) and math.isnan(d.high)


def test_one_seed_has_no_interval_and_no_pair_is_none():
    d = paired_difference({0: 1.0}, {0: 0.0})
    assert d.n == 1 and math.isnan(d.low)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_t95_and_mean_std():
    # published two-sided 95% quantiles (10 significant digits); past df = 30 too, where 1.96 was used
    known = {1: 12.70620474, 2: 4.302652730, 5: 2.570581836, 10: 2.228138852, 30: 2.042272456,
             31: 2.039513446, 40: 2.021075390, 100: 1.983971519, 1000: 1.962339081}  # fmt: skip
    for df, q in known.items():
        assert t95(df) == pytest.approx(q, rel=1e-9), df
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445105, rel=1e-9)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, rel=1e-6)  # the normal limit
    with pytest.raises(ValueError, match="at least 2"):
        t95(0)
    mean, std = mean_std([1.0])
    assert mean == 1.0 and math.isnan(std)
    assert format_mean_std(mean, std, 1) == "1.0000 (1 seed)"
    assert format_mean_std(*mean_std([1.0, 2.0]), 2) == "1.5000 ± 0.7071"
    assert format_mean_std(math.nan, math.nan, 2) == "nan ± nan"  # a diverged seed is not hidden
