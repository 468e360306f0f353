"""Seed statistics."""

from __future__ import annotations

import math

import pytest

from attnres.analysis.stats import format_mean_std, mean_std, paired_difference, t95


def test_paired_difference_t_interval():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 0.5, 1: 1.0, 2: 2.5, 7: 9.0}  # seed 7 has no pair
    d = paired_difference(a, b)
    diffs = [0.5, 1.0, 0.5]
    sd = math.sqrt(sum((x - 2 / 3) ** 2 for x in diffs) / 2)
    assert d.n == 3 and math.isclose(d.mean, 2 / 3)
    assert math.isclose(d.high - d.mean, 4.303 * sd / math.sqrt(3))


def test_one_seed_has_no_interval_and_no_pair_is_none():
    d = paired_difference({0: 1.0}, {0: 0.0})
    assert d.n == 1 and math.isnan(d.low)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_t95_and_mean_std():
    assert t95(1) == 12.706 and t95(100) == 1.96
    with pytest.raises(ValueError, match="at least 2"):
        t95(0)
    mean, std = mean_std([1.0])
    assert mean == 1.0 and math.isnan(std)
    assert format_mean_std(mean, std, 1) == "1.0000 (1 seed)"
    assert format_mean_std(*mean_std([1.0, 2.0]), 2) == "1.5000 ± 0.7071"
    assert format_mean_std(math.nan, math.nan, 2) == "nan ± nan"  # a diverged seed is not hidden
