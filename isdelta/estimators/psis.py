"""Pareto-smoothed importance sampling through arviz: the tail fits, per prompt or pooled.

arviz API, both versions (checked against the sources of arviz 0.23 and arviz-stats 1.3):

- arviz 0.x: ``arviz.psislw(ℓ)`` takes the log-ratios themselves; returns (smoothed log
  weights normalised over the last axis, k̂), batching over leading axes.
- arviz ≥ 1.0: ``arviz_stats.base.array.array_stats.psislw(−ℓ, r_eff=1)`` takes the *negated*
  log-ratios (its input is a log-likelihood, and LOO weights are 1/p(y|θ)); same returns.

A wrong sign would smooth the smallest weights and report a light tail for a heavy one, so the
backend is checked once per process on a sample with a known heavy right tail.

References
----------
Vehtari, A., Simpson, D., Gelman, A., Yao, Y., Gabry, J. (2024). Pareto smoothed importance
sampling. JMLR 25(72):1-58. https://jmlr.org/papers/v25/19-556.html
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np

from isdelta.estimators.groups import Groups

__all__ = ["MIN_TAIL_FIT", "pareto_smooth", "psis_backend"]

MIN_TAIL_FIT = 25  # rows needed per tail fit (arviz ≥ 1.0 raises below; 0.x gives k̂ = inf)

# Backend: log_r [B, S] -> (log_w [B, S] normalised over S, khat [B]).
PsisFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _guarded(batch_fn: PsisFn) -> PsisFn:
    """Run a batched PSIS call; if arviz raises, bisect the batch to isolate the bad slices.

    arviz ≥ 1.0 raises for a whole batch when one slice's tail values are all equal (ties are
    common: identical short completions have identical ratios). Bisection costs O(k log B)
    calls for k bad slices instead of B. A failed slice keeps its raw weights and k̂ = nan.
    """

    def call(log_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            return batch_fn(log_r)
        except (ValueError, FloatingPointError, ZeroDivisionError):
            if log_r.shape[0] == 1:
                from scipy.special import logsumexp

                return log_r - logsumexp(log_r, axis=-1, keepdims=True), np.full(1, np.nan)
        half = log_r.shape[0] // 2
        (w_a, k_a), (w_b, k_b) = call(log_r[:half]), call(log_r[half:])
        return np.concatenate([w_a, w_b]), np.concatenate([k_a, k_b])

    return call


def _arviz0(psislw: Callable) -> PsisFn:
    def batch(log_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            # isdelta issues its own k̂ warnings with a hint; arviz's would duplicate them.
            warnings.simplefilter("ignore")
            log_w, khat = psislw(log_r)  # 0.x: takes ℓ itself, smooths the right tail of r
        return np.asarray(log_w, dtype=np.float64), np.asarray(khat, dtype=np.float64).ravel()

    return _guarded(batch)


def _arviz1(psislw: Callable) -> PsisFn:
    def batch(log_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ≥ 1.0: the input is a log-likelihood and the weights are exp(−input), so pass −ℓ.
            log_w, khat = psislw(-log_r, r_eff=1)
        return np.asarray(log_w, dtype=np.float64), np.asarray(khat, dtype=np.float64).ravel()

    return _guarded(batch)


def _check_sign(fn: PsisFn, name: str) -> None:
    """Smoothed weights must rise with raw weights, and a Pareto(k=0.8) tail must look heavy."""
    u = (np.arange(200) + 0.5) / 200
    log_r = -0.8 * np.log1p(-u)  # r = (1−u)^(−0.8): exact Pareto quantiles with shape k = 0.8
    log_w, khat = fn(log_r[None, :])
    rising = bool(np.all(np.diff(log_w[0]) >= -1e-9))
    if not (rising and khat[0] > 0.5):
        raise RuntimeError(
            f"PSIS backend {name} failed the sign check (smoothed weights rising with raw: "
            f"{rising}; k̂ on a Pareto(0.8) tail: {khat[0]:.3f}, expected > 0.5). Its sign "
            "convention differs from arviz 0.x / arviz-stats 1.x; pin arviz and report this."
        )


@functools.lru_cache(maxsize=1)
def psis_backend() -> tuple[str, PsisFn]:
    """The installed arviz's PSIS, as ``(name, fn)`` with ``fn(log_r[B, S]) -> (log_w, khat)``.

    arviz is imported here, not at module import: ``import isdelta`` must work without it.
    """
    version = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz 0.2x announces its refactor on import
        try:
            import arviz

            version = arviz.__version__
        except ImportError:
            pass
    if version is not None and _major(version) < 1:
        name, fn = f"arviz {version}", _arviz0(arviz.psislw)
    else:
        try:
            import arviz_stats
            from arviz_stats.base.array import array_stats
        except ImportError as e:
            raise ImportError(
                "weights='psis' and the k̂ diagnostic need arviz; install it with "
                "`pip install arviz` (or use isdelta's `make setup`)."
            ) from e
        name, fn = f"arviz-stats {arviz_stats.__version__}", _arviz1(array_stats.psislw)
    _check_sign(fn, name)
    return name, fn


def pareto_smooth(
    log_r: np.ndarray, groups: Groups, per_prompt: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PSIS per prompt or pooled: ``(log_r_smoothed [N], khat [F], fit_sizes [F], constant [F])``.

    Per prompt, prompts of equal size go to arviz as one [n, G] batch (one call per distinct
    G), so 10^4 prompts cost 10^4 kernel calls inside arviz but no Python loop here. Prompts
    whose ratios are all equal need no smoothing and have no tail: k̂ = nan, ratios kept.
    The smoothed values are shifted by a constant per fit; normalise afterwards.
    """
    spread = groups.max(log_r) - groups.min(log_r)
    out = log_r.copy()
    if per_prompt:
        khat = np.full(groups.n_prompts, np.nan)
        fit = spread > 0
        if fit.any():
            fn = psis_backend()[1]
            for g in np.unique(groups.sizes[fit]):
                sel = np.flatnonzero(fit & (groups.sizes == g))
                idx = groups.starts[sel][:, None] + np.arange(g)  # [n_sel, G] row indices
                log_w, khat[sel] = fn(log_r[idx])
                out[idx] = log_w
        fit_sizes, constant = groups.sizes.copy(), ~fit
    else:
        khat = np.full(1, np.nan)
        if log_r.shape[0] >= MIN_TAIL_FIT and np.ptp(log_r) > 0:
            log_w, khat = psis_backend()[1](log_r[None, :])
            out = log_w[0]
        fit_sizes, constant = np.array([log_r.shape[0]]), np.array([np.ptp(log_r) == 0])
    # arviz 0.x returns k̂ = inf when ≤ 4 distinct values lie above the tail cutoff (ties):
    # that is "not estimable", not "infinitely bad".
    khat = np.where(np.isfinite(khat), khat, np.nan)
    return out, khat, fit_sizes, constant
