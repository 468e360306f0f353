"""How many seeds a paired comparison needs: the power of the paired t interval, and its inverses.

A paired design (variant minus baseline on the same seed) reports ``mean ± t_{0.975, n-1}·s/√n``
over ``n`` seed pairs (:func:`attnres.analysis.stats.paired_difference`). A true difference
``delta`` is *shown* when that 95% interval lies wholly on ``delta``'s side of zero. With paired
differences normal with standard deviation ``sd``, the probability of that is

    power(n) = P(T'_{n-1, λ} > t_{0.975, n-1}),   λ = |delta|·√n / sd,

where ``T'_{ν, λ}`` is the noncentral t with ``ν`` degrees of freedom and noncentrality ``λ``
(computed here by quadrature over the chi distribution, exact to ~1e-9, not the normal
approximation). The usual closed-form approximation ``n ≈ ((t_{0.975,n-1} + t_{power,n-1})·sd/delta)²``
is what :func:`approx_seeds_needed` gives, for readers who check a number by hand.

A pilot's ``sd`` is itself an estimate from few pairs; :func:`sd_upper_bound` is its one-sided
upper confidence bound (chi-square), to see how many seeds a less lucky pilot would have asked for.
"""

from __future__ import annotations

import math

from attnres.analysis.stats import invert_cdf, t_quantile


def _gammainc_lower(a: float, x: float) -> float:
    """The regularised lower incomplete gamma function ``P(a, x)`` (series, or continued fraction)."""
    if x <= 0.0:
        return 0.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:  # the series converges fast here
        term = total = 1.0 / a
        k = a
        for _ in range(10_000):
            k += 1.0
            term *= x / k
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return min(1.0, total * math.exp(log_front))
    tiny = 1e-300  # the continued fraction of Q(a, x) (modified Lentz)
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    f = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        f *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return max(0.0, 1.0 - math.exp(log_front) * f)


def chi2_cdf(x: float, df: float) -> float:
    """``P(X <= x)`` for a chi-square variable with ``df`` degrees of freedom."""
    return _gammainc_lower(df / 2.0, x / 2.0)


def chi2_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of the chi-square distribution with ``df > 0`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"chi2_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return invert_cdf(lambda x: chi2_cdf(x, df), p, high=max(1.0, df))


def noncentral_t_sf(c: float, df: float, ncp: float, intervals: int = 4000) -> float:
    """``P(T' > c)`` for the noncentral t with ``df`` degrees of freedom and noncentrality ``ncp``.

    ``T' = (Z + ncp) / U`` with ``U = √(V/df)``, ``V ~ χ²_df``, so ``P(T' > c) = E[Φ(ncp − c·U)]``:
    Simpson's rule over the density of ``U``, which is finite everywhere (also at 0 for df = 1).
    """
    if not df > 0:
        raise ValueError(f"noncentral_t_sf needs df > 0, got {df}")
    v_max = df + 12.0 * math.sqrt(2.0 * df) + 60.0  # P(V > v_max) < 1e-12 for every df
    u_max = math.sqrt(v_max / df)
    log_norm = math.log(2.0 * df) - (df / 2.0) * math.log(2.0) - math.lgamma(df / 2.0)

    def integrand(u: float) -> float:
        if u == 0.0:  # the density of U at 0: finite for df = 1, zero above
            dens = math.sqrt(2.0 / math.pi) if df == 1 else 0.0
        else:
            v = df * u * u
            dens = math.exp(log_norm + math.log(u) + (df / 2.0 - 1.0) * math.log(v) - v / 2.0)
        return dens * 0.5 * math.erfc(-(ncp - c * u) / math.sqrt(2.0))

    h = u_max / intervals
    total = integrand(0.0) + integrand(u_max)
    for i in range(1, intervals):
        total += (4.0 if i % 2 else 2.0) * integrand(i * h)
    return min(1.0, max(0.0, total * h / 3.0))


def paired_power(delta: float, sd: float, n: int, level: float = 0.95) -> float:
    """The probability that ``n`` seed pairs, with true mean difference ``delta`` and paired-difference
    standard deviation ``sd``, give a two-sided ``level`` t interval lying wholly on ``delta``'s side
    of zero. ``n < 2`` gives no interval (0); ``sd == 0`` shows any nonzero ``delta`` (1)."""
    if n < 2 or delta == 0.0 or math.isnan(sd) or math.isnan(delta):
        return 0.0
    if sd == 0.0:
        return 1.0
    df = n - 1
    crit = t_quantile(0.5 + level / 2.0, df)
    return noncentral_t_sf(crit, df, abs(delta) * math.sqrt(n) / sd)


def seeds_needed(
    delta: float,
    sd: float,
    power: float = 0.8,
    level: float = 0.95,
    min_seeds: int = 5,
    max_seeds: int = 1000,
) -> int | None:
    """The fewest seed pairs (at least ``min_seeds``) whose interval shows ``delta`` with probability
    ``power``; ``None`` when even ``max_seeds`` do not (or ``sd`` is unknown)."""
    if math.isnan(sd) or delta == 0.0:
        return None
    n = max(2, min_seeds)
    if paired_power(delta, sd, max_seeds, level) < power:
        return None
    high = max_seeds  # power grows with n: bisect for the first n that reaches it
    if paired_power(delta, sd, n, level) >= power:
        return n
    while high - n > 1:
        mid = (n + high) // 2
        n, high = (n, mid) if paired_power(delta, sd, mid, level) >= power else (mid, high)
    return high


def approx_seeds_needed(delta: float, sd: float, power: float = 0.8, level: float = 0.95) -> int:
    """The textbook approximation: the fewest ``n >= 2`` with
    ``n >= ((t_{(1+level)/2, n-1} + t_{power, n-1})·sd/delta)²``."""
    n = 2
    while n < 100_000:
        df = n - 1
        need = ((t_quantile(0.5 + level / 2.0, df) + t_quantile(power, df)) * sd / abs(delta)) ** 2
        if n >= need:
            return n
        n += 1
    return n


def detectable_difference(sd: float, n: int, power: float = 0.8, level: float = 0.95) -> float:
    """The smallest true difference that ``n`` seed pairs show with probability ``power`` (``nan``
    when ``n < 2`` or ``sd`` is unknown)."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0.0:
        return 0.0
    low, high = 0.0, sd
    while paired_power(high, sd, n, level) < power:
        high *= 2.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if paired_power(mid, sd, n, level) < power else (low, mid)
        if high - low < 1e-7 * sd:
            break
    return high


def sd_upper_bound(sd: float, n_pairs: int, confidence: float = 0.8) -> float:
    """The one-sided ``confidence`` upper bound on the true standard deviation, from the sample
    standard deviation ``sd`` of ``n_pairs`` values: ``sd·√((n−1)/χ²_{1−confidence, n−1})``."""
    if n_pairs < 2 or math.isnan(sd):
        return math.nan
    df = n_pairs - 1
    return sd * math.sqrt(df / chi2_quantile(1.0 - confidence, df))
