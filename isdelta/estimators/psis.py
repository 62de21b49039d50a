"""Pareto-smoothed importance sampling, vectorised over prompts: the tail fits, per prompt or pooled.

arviz computes PSIS one 1-D slice at a time in Python (10^4 prompts: 10^4 interpreted fits, ~0.8 s
of ``estimate``'s 1 s on 10^6 rows). :func:`psis` does the same arithmetic for every row of a
[B, S] array at once, following the installed arviz's convention exactly (the tests compare the
two to 1e-12, on both APIs; arviz is the reference there, not a run-time dependency of the fit):

- arviz 0.x: ``arviz.psislw(ℓ)`` takes the log-ratios themselves; returns (smoothed log
  weights normalised over the last axis, k̂).
- arviz ≥ 1.0: ``arviz_stats.base.array.array_stats.psislw(−ℓ, r_eff=1)`` takes the *negated*
  log-ratios (its input is a log-likelihood, and LOO weights are 1/p(y|θ)); same returns.

References
----------
Vehtari, A., Simpson, D., Gelman, A., Yao, Y., Gabry, J. (2024). Pareto smoothed importance
sampling. JMLR 25(72):1-58. https://jmlr.org/papers/v25/19-556.html
Zhang, J., Stephens, M. A. (2009). A new and efficient estimation method for the generalized
Pareto distribution. Technometrics 51(3):316-325. https://doi.org/10.1198/tech.2009.08017
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

from isdelta.estimators.groups import Groups

__all__ = ["MIN_TAIL_FIT", "installed_flavour", "pareto_smooth", "psis"]

MIN_TAIL_FIT = 25  # rows needed per tail fit (arviz ≥ 1.0 raises below; 0.x gives k̂ = inf)


Flavour = Literal["arviz0", "arviz1"]


def _major(version: str) -> int:
    return int(version.split(".")[0])


@functools.lru_cache(maxsize=1)
def installed_flavour() -> Flavour:
    """The PSIS convention of the installed arviz: "arviz0" (0.x) or "arviz1" (arviz-stats ≥ 1).

    The two differ in the tail (0.x: the values above the ceil(min(S/5, 3√S)) + 1-th largest,
    ties at the cutoff excluded; 1.x: the floor(S/5) largest, or floor(3√S) when S > 225) and in
    a guard of the tail fit; isdelta reproduces whichever is installed, so its weights equal
    arviz's. Without arviz: "arviz1", the maintained one.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed version, without importing arviz (2–3 s of xarray and friends)
        return "arviz0" if _major(version("arviz")) < 1 else "arviz1"
    except PackageNotFoundError:
        return "arviz1"


def psis(log_r: np.ndarray, flavour: Flavour | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PSIS of every row of ``log_r`` [B, S] at once: ``(log_w [B, S], khat [B])``.

    ``log_w`` are the smoothed log weights, normalised over each row; ``khat`` the Pareto shape
    of each row's tail fit (nan where no fit is possible: too few distinct tail values, or a
    degenerate fit). Rows are independent; all share S, so the tail fits run as one batch.

    Naive equivalent, per row and up to 1e-12: ``arviz.psislw(log_r[b])`` (arviz 0.x) or
    ``arviz_stats.base.array.array_stats.psislw(-log_r[b], r_eff=1)`` (arviz ≥ 1.0, which takes
    the negated log-ratios); the tests compare the two on both conventions.
    """
    flavour = flavour or installed_flavour()
    x = np.asarray(log_r, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)  # [B, S]; the largest log weight is 0
    B, S = x.shape
    order = np.argsort(x, axis=1)  # [B, S] ascending
    if flavour == "arviz0":
        n_tail = int(np.ceil(min(S / 5.0, 3 * S**0.5)))
        cutoff = np.maximum(np.take_along_axis(x, order[:, -n_tail - 1 : -n_tail], 1)[:, 0], _LOG_TINY)
        in_tail = x > cutoff[:, None]  # [B, S]: ties at the cutoff stay out
        sizes = in_tail.sum(axis=1)
    else:
        n_tail = int(np.floor(3 * S**0.5)) if S > 225 else S // 5
        cutoff = np.take_along_axis(x, order[:, -n_tail - 1 : -n_tail], 1)[:, 0]
        sizes = np.full(B, n_tail)
    khat = np.full(B, np.nan)
    out = x  # a new array already; each batch below writes only rows that it alone reads
    for n in np.unique(sizes[sizes > 4]):  # one batch per tail size (0.x: ties shorten a tail)
        rows = np.flatnonzero(sizes == n)
        # the n largest values of each row, ascending, and where they sit: [R, n]; 0.x sorts
        # the tail values taken in row order, 1.x takes them from the whole row's sort (the
        # two place tied values differently, so each is followed exactly)
        idx = order[rows, S - n :]
        tail = x[rows[:, None], idx]  # (gathers [R, n], not the rows' whole [R, S])
        tied = (np.diff(tail, axis=1) == 0).any(axis=1) if flavour == "arviz0" else np.zeros(len(rows), bool)
        if tied.any():
            t = rows[tied]
            pos = np.nonzero(in_tail[t])[1].reshape(len(t), n)  # [T, n] in row order
            idx[tied] = np.take_along_axis(pos, np.argsort(np.take_along_axis(x[t], pos, 1), axis=1), 1)
        if flavour == "arviz1":  # arviz-stats refuses a tail of equal values
            keep = tail[:, -1] - tail[:, 0] >= np.finfo(float).tiny
            rows, idx, tail = rows[keep], idx[keep], tail[keep]
        c = np.exp(cutoff[rows])  # [R]
        k, sigma = _gpdfit(np.exp(tail) - c[:, None], flavour)
        khat[rows] = k
        ok = np.isfinite(k)
        smooth = np.log(_gpinv(n, k[ok], sigma[ok]) + c[ok, None])  # [R', n]
        smooth = np.minimum(smooth, 0.0 if flavour == "arviz0" else tail[ok, -1:])
        out[rows[ok, None], idx[ok]] = smooth
    khat[~np.isfinite(khat)] = np.nan
    top = out.max(axis=1, keepdims=True)
    return out - (top + np.log(np.exp(out - top).sum(axis=1, keepdims=True))), khat


_LOG_TINY = float(np.log(np.finfo(float).tiny))  # arviz 0.x's floor on the tail cutoff


def _gpdfit(tail: np.ndarray, flavour: Flavour) -> tuple[np.ndarray, np.ndarray]:
    """Generalised Pareto fit of each row of ``tail`` [R, n] (ascending, > 0): ``(k [R], σ [R])``.

    Zhang & Stephens' (2009) empirical-Bayes estimate with arviz's weakly informative prior on k
    (10 pseudo-observations at 0.5), vectorised over rows: m = 30 + ⌊√n⌋ candidate values of
    b = −k/σ, their profile likelihoods, and k̂ from the posterior mean of b.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # degenerate rows give nan
        return _gpdfit_rows(tail, flavour)


def _gpdfit_rows(tail: np.ndarray, flavour: Flavour) -> tuple[np.ndarray, np.ndarray]:
    n = tail.shape[1]
    m = 30 + int(n**0.5)
    xstar = tail[:, int(n / 4 + 0.5) - 1]  # first quartile of the tail
    b = (1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5)))[None, :] / (3 * xstar[:, None]) + 1 / tail[:, -1:]  # [R, m]
    # k(b) = mean log(1 − b·x) over the tail, [R, m]: log rather than log1p (b·x is not tiny
    # here, the absolute error stays ~1e-16, and numpy's log is vectorised: 3× faster), in place
    bx = b[:, :, None] * tail[:, None, :]  # [R, m, n], the largest temporary of PSIS
    np.subtract(1.0, bx, out=bx)
    k = np.log(bx, out=bx).mean(axis=2)
    del bx
    len_scale = n * (np.log(-(b / k)) - k - 1)  # [R, m]: profile log-likelihood of each b
    # posterior weight of each b: 1 / Σ_j exp(ℓ_j − ℓ_i) (arviz 0.x's form, an [m, m] matrix per
    # row) = exp(ℓ_i − logsumexp ℓ) (arviz-stats'): equal to rounding, and m times cheaper
    top = len_scale.max(axis=1, keepdims=True)
    w = np.exp(len_scale - (top + np.log(np.exp(len_scale - top).sum(axis=1, keepdims=True))))
    w = np.where(w >= 10 * np.finfo(float).eps, w, 0.0)  # negligible weights out
    w /= w.sum(axis=1, keepdims=True)
    b_post = (b * w).sum(axis=1)  # [R]
    k_post = np.log1p(-b_post[:, None] * tail).mean(axis=1)
    sigma = -k_post / b_post
    k_post = (n * k_post + 10 * 0.5) / (n + 10)
    if flavour == "arviz1":  # its guards: a first quartile at the minimum, or a nan k
        bad = (xstar <= tail[:, 0]) | np.isnan(k_post)
        k_post, sigma = np.where(bad, np.nan, k_post), np.where(bad, np.nan, sigma)
    return k_post, sigma


def _gpinv(n: int, k: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Generalised Pareto quantiles at (i − ½)/n, i = 1…n, for each row's (k, σ): [R, n]."""
    p = np.arange(0.5, n) / n  # [n]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.expm1(-k[:, None] * np.log1p(-p)[None, :]) / k[:, None]
    exponential = np.abs(k) < np.finfo(float).eps  # k → 0: the exponential distribution
    q[exponential] = -np.log1p(-p)
    q = q * sigma[:, None]
    return np.where(sigma[:, None] > 0, q, np.nan)


def pareto_smooth(
    log_r: np.ndarray, groups: Groups, per_prompt: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PSIS per prompt or pooled: ``(log_r_smoothed [N], khat [F], fit_sizes [F], constant [F])``.

    Per prompt, prompts of equal size go to :func:`psis` as one [n, G] batch (one call per
    distinct G): 10^4 prompts cost one vectorised tail fit, no Python loop over prompts. Prompts
    whose ratios are all equal need no smoothing and have no tail: k̂ = nan, ratios kept.
    The smoothed values are shifted by a constant per fit; normalise afterwards.
    """
    if per_prompt:
        khat = np.full(groups.n_prompts, np.nan)
        fit = groups.max(log_r) > groups.min(log_r)
        out = np.empty_like(log_r) if fit.all() else log_r.copy()  # every row below, or constant prompts kept
        for g in np.unique(groups.sizes[fit]):
            sel = np.flatnonzero(fit & (groups.sizes == g))
            # blocks of ≈ BLOCK_ROWS rows: psis' temporaries (the tail fit's [R, m, n] grid the
            # largest) stay in cache, which halves its time on 10^6 rows
            for block in np.array_split(sel, min(sel.size, -(-sel.size * int(g) // BLOCK_ROWS))):
                rows = _rows(groups, block, int(g))
                log_w, khat[block] = psis(log_r[rows].reshape(block.size, g))
                out[rows] = log_w.reshape(-1) if isinstance(rows, slice) else log_w
        fit_sizes, constant = groups.sizes.copy(), ~fit
    else:
        khat, out = np.full(1, np.nan), log_r.copy()
        if log_r.shape[0] >= MIN_TAIL_FIT and np.ptp(log_r) > 0:
            log_w, khat = psis(log_r[None, :])
            out = log_w[0]
        fit_sizes, constant = np.array([log_r.shape[0]]), np.array([np.ptp(log_r) == 0])
    return out, khat, fit_sizes, constant


BLOCK_ROWS = 2**15  # rows per psis call in pareto_smooth (256 KiB per float64 [R, G] array)


def _rows(groups: Groups, sel: np.ndarray, g: int) -> slice | np.ndarray:
    """The rows of prompts ``sel`` (each of G = g rows): a slice when the prompts are consecutive
    (no gather, no scatter), else their row indices [len(sel), G]."""
    first = int(groups.starts[sel[0]])
    if sel[-1] - sel[0] == sel.size - 1:  # consecutive prompts of one size: consecutive rows
        return slice(first, first + sel.size * g)
    return groups.starts[sel][:, None] + np.arange(g)


def pooled_khat(log_r: np.ndarray, groups: Groups) -> tuple[float, int]:
    """k̂ of one tail fit over every row of the ratios relative to their prompt's mean ratio:
    ``(khat, S)`` with S = N rows; nan when N < ``MIN_TAIL_FIT`` or the ratios are all equal.

    ℓ_i − log mean_{j∈p} r_j puts every prompt on one scale (each prompt's mean ratio is 1 under
    p0), so a heavy tail in any prompt reaches the pooled tail, and the fit has N rows where a
    per-prompt fit has G: its threshold min(1 − 1/log10 S, 0.7) is higher and its noise lower.
    """
    n = log_r.shape[0]
    rel = log_r - groups.expand(groups.logsumexp(log_r) - np.log(groups.sizes))
    if n < MIN_TAIL_FIT or not np.ptp(rel) > 0:
        return float("nan"), n
    return float(psis(rel[None, :])[1][0]), n
