"""The power of the paired t interval and the seed counts it implies, on known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnres.analysis.power import (
    approx_seeds_needed,
    chi2_cdf,
    chi2_quantile,
    detectable_difference,
    noncentral_t_sf,
    paired_power,
    sd_upper_bound,
    seeds_needed,
)
from attnres.analysis.stats import t95


def test_noncentral_t_and_chi_square_match_published_values():
    # scipy.stats.nct.sf / chi2.ppf / chi2.cdf (scipy 1.17), 10+ significant digits
    assert noncentral_t_sf(2.7764451051977987, 4, 3.0) == pytest.approx(0.6192575370802119, rel=1e-9)
    assert noncentral_t_sf(12.706204736174704, 1, 3.0) == pytest.approx(0.18610807424628512, rel=1e-8)
    assert noncentral_t_sf(2.0422724563012373, 30, 1.0) == pytest.approx(0.16066868781756172, rel=1e-9)
    assert noncentral_t_sf(0.0, 5, 0.0) == pytest.approx(0.5, abs=1e-12)  # the central t is symmetric
    assert chi2_quantile(0.2, 3) == pytest.approx(1.0051740130523492, rel=1e-10)
    assert chi2_quantile(0.975, 100) == pytest.approx(129.5611971858366, rel=1e-10)
    assert chi2_quantile(0.2, 1) == pytest.approx(0.0641847546673016, rel=1e-10)
    assert chi2_cdf(40.0, 30) == pytest.approx(0.8951357188920153, rel=1e-10)
    assert chi2_cdf(0.0, 3) == 0.0
    with pytest.raises(ValueError, match="0 < p < 1"):
        chi2_quantile(1.0, 3)


def test_paired_power_known_value_and_degenerate_cases():
    # n = 10 pairs, sd 0.03, true difference 0.02: scipy.stats.nct.sf(t.ppf(0.975, 9), 9, 0.02·√10/0.03)
    assert paired_power(0.02, 0.03, 10) == pytest.approx(0.46918054368612366, rel=1e-8)
    assert paired_power(-0.02, 0.03, 10) == paired_power(0.02, 0.03, 10)  # the side does not matter
    assert paired_power(0.02, 0.03, 1) == 0.0  # one seed: no interval at all
    assert paired_power(0.02, 0.0, 2) == 1.0  # identical runs up to the difference: always shown
    assert paired_power(0.0, 0.03, 10) == 0.0  # no difference is never "shown" on a side
    assert paired_power(0.02, math.nan, 10) == 0.0


def test_paired_power_agrees_with_simulated_intervals():
    rng = np.random.default_rng(0)
    n, sd, delta, sims = 8, 0.03, -0.02, 40_000
    d = rng.normal(delta, sd, size=(sims, n))
    high = d.mean(1) + t95(n - 1) * d.std(1, ddof=1) / math.sqrt(n)
    shown = float((high < 0).mean())
    assert shown == pytest.approx(paired_power(delta, sd, n), abs=0.01)


def test_seeds_needed_is_the_first_count_with_enough_power():
    n = seeds_needed(0.02, 0.03)
    assert n == 20
    assert paired_power(0.02, 0.03, n) >= 0.8 > paired_power(0.02, 0.03, n - 1)
    assert abs(approx_seeds_needed(0.02, 0.03) - n) <= 1  # the textbook formula is close
    assert seeds_needed(0.02, 0.001) == 5  # never fewer than the floor
    assert seeds_needed(0.02, 0.0) == 5  # identical runs
    assert seeds_needed(0.02, math.nan) is None  # one pilot seed: unknown
    assert seeds_needed(0.02, 10.0) is None  # more than 1000 seeds
    assert seeds_needed(0.02, 0.03, min_seeds=2, power=0.5) < n


def test_detectable_difference_inverts_the_power():
    mde = detectable_difference(0.03, 5)
    assert paired_power(mde, 0.03, 5) == pytest.approx(0.8, abs=1e-5)
    assert detectable_difference(0.03, 10) < mde  # more seeds, smaller differences
    assert math.isnan(detectable_difference(0.03, 1))
    assert detectable_difference(0.0, 5) == 0.0


def test_sd_upper_bound():
    # four pairs: sd·√(3/χ²(0.2; 3))
    assert sd_upper_bound(0.03, 4) == pytest.approx(0.03 * math.sqrt(3 / 1.0051740130523492), rel=1e-10)
    assert sd_upper_bound(0.03, 4, confidence=0.95) > sd_upper_bound(0.03, 4)
    assert math.isnan(sd_upper_bound(0.03, 1))
    assert sd_upper_bound(0.0, 5) == 0.0
