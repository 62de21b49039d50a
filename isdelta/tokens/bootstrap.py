"""Bootstrap over carriers: confidence intervals for position-weighted means.

numpy + scipy only (no torch).

A token-stage aggregate is a mean over positions, x̄ = Σ_u S_u / Σ_u n_u, where unit u (one
carrier row, i.e. one sequence; or one prompt) contributes the sum S_u of its n_u positions.
Positions of one sequence share a prefix and a model state, so they are not independent: a
bootstrap that resamples positions treats n correlated values as n independent ones and its
interval is too narrow (the tests measure this). Here the *units* are resampled with
replacement, within each stratum (each carrier kind: p0 samples, p1 samples, reference), and the
ratio is recomputed::

    c_b ~ Multinomial(U_s, 1/U_s) per stratum s     # counts of each unit in resample b, [B, U]
    x̄_b = (c_b · S) / (c_b · n)                     # [B, K] for K statistics at once
    CI = percentile interval of x̄_b at (1 ± level) / 2

The naive equivalent is a Python loop drawing ``rng.choice(U, U)`` per resample and averaging
the chosen units' positions; the count matrix gives the same distribution in one matrix product.
Resamples that hold no position of the group (possible for a rare class) are left out.

References
----------
Efron, B. & Tibshirani, R. (1993). *An Introduction to the Bootstrap*, ch. 6 and 13 (percentile
interval). Field, C. A. & Welsh, A. H. (2007). Bootstrapping clustered data. *J. R. Stat. Soc. B*
69(3), 369–390. https://doi.org/10.1111/j.1467-9868.2007.00593.x
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

__all__ = ["Interval", "resample_counts", "sign_test", "unit_sums", "weighted_ci"]


def resample_counts(strata: np.ndarray, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Bootstrap counts [B, U]: how often each unit appears in each resample.

    Units are resampled with replacement within their stratum, so every resample keeps each
    stratum's size (a carrier kind with 16 rows has 16 rows in every resample).

    Parameters
    ----------
    strata : array [U]
        A stratum label per unit (any hashable values; one label: the plain bootstrap).
    n_boot : int
        Resamples B.
    seed : int or numpy Generator

    Returns
    -------
    float64 [B, U]
        Non-negative integer counts; each row sums to U, and to U_s within stratum s.
    """
    strata = np.asarray(strata)
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of resamples; got {n_boot}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(strata)))
    for s in dict.fromkeys(strata.tolist()):  # in order of first appearance: reproducible
        cols = np.flatnonzero(strata == s)
        counts[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=n_boot)
    return counts


def unit_sums(values: np.ndarray, units: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums [U, K] of ``values`` [M, K] (or [M]) and position counts [U].

    ``units`` [M] holds each position's unit index in [0, n_units).
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    units = np.asarray(units, dtype=np.int64)
    sums = np.zeros((n_units, values.shape[1]))
    np.add.at(sums, units, values)
    return sums, np.bincount(units, minlength=n_units).astype(np.float64)


@dataclass(frozen=True)
class Interval:
    """A position-weighted mean with its bootstrap interval over units (all arrays [K]).

    ``lo``/``hi`` are NaN where no interval exists (fewer than two units hold positions, or a
    value is infinite); ``n_units`` counts the units holding positions of the group.
    """

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_units: int
    n_boot: int  # resamples that held a position of the group

    @property
    def excludes_zero(self) -> np.ndarray:
        """bool [K]: the interval lies strictly above or strictly below 0."""
        return (self.lo > 0) | (self.hi < 0)


def weighted_ci(sums: np.ndarray, n: np.ndarray, counts: np.ndarray, level: float = 0.95) -> Interval:
    """Position-weighted means Σ S_u / Σ n_u [K] with percentile intervals over resampled units.

    Parameters
    ----------
    sums : float [U, K]
        Per-unit sums of K statistics over the group's positions (:func:`unit_sums`).
    n : float [U]
        Per-unit position counts of the group (0 for units without one).
    counts : float [B, U]
        Bootstrap counts (:func:`resample_counts`), shared by every group and statistic so that
        their intervals come from the same resamples.
    level : float
        Coverage of the interval (0.95).

    Returns
    -------
    Interval
    """
    if not 0 < level < 1:
        raise ValueError(f"ci_level must lie in (0, 1); got {level}.")
    sums, n = np.asarray(sums, dtype=np.float64), np.asarray(n, dtype=np.float64)
    K, total = sums.shape[1], n.sum()
    mean = sums.sum(0) / total if total > 0 else np.full(K, np.nan)
    n_units = int(np.sum(n > 0))
    nan = np.full(K, np.nan)
    if n_units < 2:
        return Interval(mean, nan, nan, n_units, 0)
    finite = np.isfinite(sums).all(0)  # an inf KL: the mean is inf, and no interval exists
    denom = counts @ n  # [B]
    keep = denom > 0
    boot = (counts[keep] @ np.where(finite, sums, 0.0)) / denom[keep, None]  # [B', K]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=0) if len(boot) else (nan, nan)
    return Interval(mean, np.where(finite, lo, np.nan), np.where(finite, hi, np.nan), n_units, int(keep.sum()))


def sign_test(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided sign-test p-values [K] over units: is the per-unit mean as often > 0 as < 0?

    Each unit holding positions contributes the sign of its own mean S_u / n_u (ties at 0 are
    dropped, as in the classical sign test); ``scipy.stats.binomtest`` with p = 1/2. NaN where
    no unit has a non-zero mean.
    """
    sums, n = np.asarray(sums, dtype=np.float64), np.asarray(n, dtype=np.float64)
    held = sums[n > 0]  # the sign of the sum is the sign of the mean
    out = np.full(sums.shape[1], np.nan)
    for k in range(sums.shape[1]):
        pos, neg = int(np.sum(held[:, k] > 0)), int(np.sum(held[:, k] < 0))
        if pos + neg:
            out[k] = binomtest(pos, pos + neg, 0.5).pvalue
    return out
