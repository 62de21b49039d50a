"""Importance weights for SNIS: normalisation, ESS, PSIS, truncation, clipping, k̂.

x_i ~ p0, log-ratio ℓ_i = S1_i − S0_i = log p1(x_i) − log p0(x_i), r_i = exp(ℓ_i).
Within each prompt p the self-normalised weights are w̄_i = r_i / Σ_{j∈p} r_j, computed in
log space (``log_w``) so that sequence-level ratios of e^{±500} never overflow.

Schemes (``scheme``):

- ``"none"``: raw SNIS weights.
- ``"psis"``: Pareto-smoothed (Vehtari et al. 2024) through arviz: the largest ratios are
  replaced by the expected order statistics of a generalised Pareto fit to the tail.
- ``"truncate"``: Ionides (2008) truncation r ≤ mean(r)·√S.
- ``"clip"``: r ≤ c for a caller-chosen c (on the raw, unnormalised ratio).

PSIS and truncation are applied to each prompt's log-ratios when every prompt has at least
``MIN_TAIL_FIT`` = 25 rows (arviz ≥ 1.0 refuses a tail fit on fewer, and arviz 0.x returns
k̂ = inf there), otherwise once to all rows pooled; the per-prompt normalisation is applied after
smoothing either way. k̂ is always computed (with the same per-prompt / pooled rule) because it
diagnoses the raw ratios, whatever scheme is then used.

The PSIS tail fits themselves (arviz, both API versions) are in :mod:`isdelta.estimators.psis`.

References
----------
Vehtari, A., Simpson, D., Gelman, A., Yao, Y., Gabry, J. (2024). Pareto smoothed importance
sampling. JMLR 25(72):1-58. https://jmlr.org/papers/v25/19-556.html
Ionides, E. L. (2008). Truncated importance sampling. JCGS 17(2):295-311.
https://doi.org/10.1198/106186008X320456
Kong, A. (1992). A note on importance sampling using standardized weights. Tech. rep. 348,
University of Chicago (ESS = 1/Σ w̄²).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from isdelta.estimators import inputs
from isdelta.estimators.groups import Groups
from isdelta.estimators.inputs import Scheme
from isdelta.estimators.psis import MIN_TAIL_FIT, pareto_smooth
from isdelta.outputs import finite_or_none

__all__ = [
    "MIN_TAIL_FIT",
    "Scheme",
    "Weights",
    "clip",
    "ess_per_prompt",
    "importance_weights",
    "khat_threshold",
    "min_sample_size",
    "normalize",
    "pooled_ess",
    "truncate",
    "weigh",
]


@dataclass(frozen=True)
class Weights:
    """Self-normalised weights and their diagnostics.

    Row arrays are in prompt-sorted order from :func:`weigh` (what the estimators use) and in
    the caller's order and shape from :func:`importance_weights`.

    Attributes
    ----------
    w : ndarray, float64, shape [N]
        w̄_i, normalised within each prompt (Σ_{i∈p} w̄_i = 1), of the scheme used.
    log_w : ndarray, float64, shape [N]
        log w̄_i.
    w_raw : ndarray, float64, shape [N]
        The raw SNIS weights r_i / Σ_{j∈p} r_j before any smoothing (``w`` itself for "none").
    ess : ndarray, float64, shape [P]
        ESS_p = 1 / Σ_{i∈p} w̄_i² of the weights actually used.
    khat : ndarray, float64, shape [F]
        Pareto k̂ of each tail fit of the raw ratios (F = P per prompt, F = 1 pooled);
        nan where not estimable (fewer than 25 rows, or tied / constant ratios).
    fit_sizes : ndarray of int, shape [F]
        S, the number of rows in each tail fit (sets the k̂ threshold).
    constant : ndarray of bool, shape [F]
        Fits whose log-ratios are all equal: weights exactly uniform, no tail to diagnose.
    per_prompt : bool
        True when tail fits (and truncation) were done per prompt, False when pooled.
    scheme : str
        The weighting scheme used.
    description : str
        One line for reports, e.g.
        ``"psis, tail fit per prompt (100 prompts, G=25..40), then normalised per prompt"``.
    mean_ratio : ndarray, float64, shape [P], or None
        mean_{i∈p} r_i of the raw ratios (log-space mean, then exp: +inf past float64), a
        by-product of normalising them; None in a Weights built by hand.
    """

    w: np.ndarray
    log_w: np.ndarray
    w_raw: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    fit_sizes: np.ndarray
    constant: np.ndarray
    per_prompt: bool
    scheme: str
    description: str
    mean_ratio: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def in_caller_order(self, groups: Groups, shape: tuple[int, ...]) -> Weights:
        """The row arrays unsorted to the caller's row order and reshaped to ``shape``."""
        rows = {k: groups.unsort(getattr(self, k)).reshape(shape) for k in ("w", "log_w", "w_raw")}
        return dataclasses.replace(self, **rows)

    def to_dict(self) -> dict:
        """JSON-serialisable summary without the row arrays (per-prompt arrays as lists; nan as
        None)."""
        return {
            "scheme": self.scheme,
            "per_prompt": self.per_prompt,
            "description": self.description,
            "ess": [finite_or_none(v) for v in self.ess],
            "khat": [finite_or_none(v) for v in self.khat],
            "fit_sizes": [int(s) for s in self.fit_sizes],
            "constant": [bool(c) for c in self.constant],
        }


# ---------------------------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------------------------


def normalize(log_r: np.ndarray, groups: Groups) -> np.ndarray:
    """log w̄_i = ℓ_i − log Σ_{j∈p} exp(ℓ_j), per prompt; [N] sorted -> [N] sorted."""
    return _normalized(log_r, groups)[1]


def _normalized(log_r: np.ndarray, groups: Groups) -> tuple[np.ndarray, np.ndarray]:
    """(w̄, log w̄) per prompt, with w̄ = r / Σ r and r = exp(ℓ − max_p ℓ) ≤ 1.

    Shifting by the prompt maximum is the logsumexp trick; dividing in linear space (rather
    than exponentiating ℓ − logsumexp) gives w̄ = 1/G bit for bit when all ratios of a prompt
    are equal, so p1 = p0 yields ΔH = 0 exactly rather than a rounding residue. A weight that
    underflows here is below 1e-308 of the prompt's largest, i.e. zero in any representation.
    """
    norm = _Normalized.of(log_r, groups, with_log=True)
    return norm.w, norm.log_w


@dataclass(frozen=True)
class _Normalized:
    """w̄ of :func:`_normalized` with, from the same pass, log w̄, Σ_{i∈p} w̄_i² (both where asked
    for) and log mean_{i∈p} r_i, [P]."""

    w: np.ndarray
    log_w: np.ndarray | None
    sum_sq: np.ndarray | None
    log_mean: np.ndarray

    @classmethod
    def of(cls, log_r: np.ndarray, groups: Groups, with_log: bool) -> _Normalized:
        """Block by block (``Groups.blocks``: each block's temporaries stay in the CPU cache)."""
        w = np.empty_like(log_r)
        log_w = np.empty_like(log_r) if with_log else None
        sum_sq = np.empty(groups.n_prompts) if with_log else None
        log_sum, buf = np.empty(groups.n_prompts), groups.scratch(1)[0]
        with np.errstate(divide="ignore"):
            for ps, rs, bg in groups.blocks:
                top = bg.max(log_r[rs])  # [p]
                r = bg.shaped(w[rs])  # r, then w̄, written in place into w
                np.subtract(bg.shaped(log_r[rs]), bg.per_row(top), out=r)
                np.exp(r, out=r)
                total = bg.sum(w[rs])
                r /= bg.per_row(total)
                log_sum[ps] = top + np.log(total)  # Groups.logsumexp (for finite ratios)
                if with_log:
                    sum_sq[ps] = bg.sum(np.multiply(w[rs], w[rs], out=buf[: rs.stop - rs.start]))
                    np.log(w[rs], out=log_w[rs])
        return cls(w, log_w, sum_sq, log_sum - np.log(groups.sizes))


def ess_per_prompt(w: np.ndarray, groups: Groups) -> np.ndarray:
    """ESS_p = 1 / Σ_{i∈p} w̄_i² (Kong 1992) from normalised weights, [N] -> [P]."""
    return 1.0 / groups.sum(w * w)


def pooled_ess(ess: np.ndarray) -> float:
    """ESS of the whole estimate, 1 / Σ_i (w̄_i / P)² = P² / Σ_p (1 / ESS_p).

    Each prompt has mass 1/P, so row i's weight in the pooled average is w̄_i / P. With
    uniform weights and equal G this is N; with ragged G it is below N because unequal
    per-row masses cost efficiency.
    """
    n_prompts = ess.shape[0]
    return float(n_prompts**2 / np.sum(1.0 / ess))


def khat_threshold(n_samples: float | np.ndarray) -> float | np.ndarray:
    """Sample-size dependent k̂ threshold min(1 − 1/log10 S, 0.7) (Vehtari et al. 2024).

    Below S ≈ 100 the threshold drops under 0.5: a small sample cannot vouch for a tail.
    """
    s = np.asarray(n_samples, dtype=float)
    out = np.minimum(1.0 - 1.0 / np.log10(s), 0.7)
    return float(out) if out.ndim == 0 else out


def min_sample_size(khat: float) -> float:
    """S_min = 10^{1/(1−k̂)}: samples needed for a reliable PSIS estimate (k̂<0 counts as 0).

    inf for k̂ ≥ 1 (no finite sample suffices: the ratio has no finite mean), nan for nan.
    """
    if not np.isfinite(khat):
        return float("nan") if np.isnan(khat) else float("inf")
    exponent = 1.0 / (1.0 - max(khat, 0.0)) if khat < 1.0 else np.inf
    return float(10.0**exponent) if exponent < 308 else float("inf")  # beyond float64: inf


def truncate(log_r: np.ndarray, groups: Groups, per_prompt: bool) -> np.ndarray:
    """Ionides truncation, log r ≤ log(mean(r)·√S), per prompt or pooled; [N] -> [N].

    Invariant to a constant shift of ℓ (the cap moves with the mean), unlike ``clip``.
    """
    if per_prompt:
        log_g = np.log(groups.sizes.astype(float))
        log_cap = groups.expand(groups.logsumexp(log_r) - 0.5 * log_g)  # log mean + ½ log G
    else:
        from scipy.special import logsumexp

        n = log_r.shape[0]
        log_cap = logsumexp(log_r) - 0.5 * np.log(n)
    return np.minimum(log_r, log_cap)


def clip(log_r: np.ndarray, c: float) -> np.ndarray:
    """Clip the raw ratio, r ≤ c, i.e. ℓ ≤ log c; [N] -> [N].

    Acts on the unnormalised r = p1/p0 (whose mean is 1 when both models cover the same
    support), like PPO's ratio clip; so unlike PSIS and truncation it is not invariant to a
    constant shift of log_p1.
    """
    return np.minimum(log_r, np.log(c))


# ---------------------------------------------------------------------------------------------
# The weights used by the estimators
# ---------------------------------------------------------------------------------------------


def weigh(log_r: np.ndarray, groups: Groups, scheme: str, clip_at: float | None) -> Weights:
    """Normalised weights of one scheme plus ESS and k̂; rows in prompt-sorted order.

    The same per-prompt / pooled rule (every G_p ≥ 25) decides where PSIS, truncation and the
    k̂ fits are done. Normalisation is always per prompt, after any smoothing.
    """
    per_prompt = bool(groups.sizes.min() >= MIN_TAIL_FIT)
    smoothed, khat, fit_sizes, constant = pareto_smooth(log_r, groups, per_prompt)
    if scheme == "psis":
        used = smoothed
    elif scheme == "truncate":
        used = truncate(log_r, groups, per_prompt)
    elif scheme == "clip":
        if clip_at is None:
            raise ValueError("weights='clip' needs clip=c > 0 (the cap on r = p1/p0).")
        used = clip(log_r, clip_at)
    else:
        used = log_r
    norm = _Normalized.of(used, groups, with_log=True)
    raw = norm if scheme == "none" else _Normalized.of(log_r, groups, with_log=False)
    with np.errstate(over="ignore"):
        mean_ratio = np.exp(raw.log_mean)
    return Weights(
        w=norm.w,
        log_w=norm.log_w,
        w_raw=raw.w,
        ess=1.0 / norm.sum_sq,  # ess_per_prompt
        mean_ratio=mean_ratio,
        khat=khat,
        fit_sizes=fit_sizes,
        constant=constant,
        per_prompt=per_prompt,
        scheme=scheme,
        description=_describe(scheme, groups, per_prompt, clip_at),
    )


def _describe(scheme: str, groups: Groups, per_prompt: bool, clip_at: float | None) -> str:
    g_lo, g_hi = int(groups.sizes.min()), int(groups.sizes.max())
    g = f"G={g_lo}" if g_lo == g_hi else f"G={g_lo}..{g_hi}"
    n, p = groups.n_rows, groups.n_prompts
    where = (
        f"per prompt ({p} prompts, {g})"
        if per_prompt
        else f"pooled over all {n} rows (smallest prompt G={g_lo} < {MIN_TAIL_FIT})"
    )
    if scheme == "psis":
        if not per_prompt and n < MIN_TAIL_FIT:
            return (
                f"psis NOT applied: {n} rows < {MIN_TAIL_FIT} needed for a tail fit; raw SNIS "
                "weights, normalised per prompt"
            )
        return f"psis, tail fit {where}, then normalised per prompt"
    if scheme == "truncate":
        cap = "mean(r)·√G per prompt" if per_prompt else "mean(r)·√N pooled"
        return f"truncate (r ≤ {cap}), {where}, then normalised per prompt"
    if scheme == "clip":
        return f"clip (r ≤ {clip_at:g}), normalised per prompt; k̂ {where}"
    return f"none (raw SNIS), normalised per prompt; k̂ {where}"


def importance_weights(
    log_r: np.ndarray, group: np.ndarray | None = None, *, scheme: Scheme = "psis", clip: float | None = None
) -> Weights:
    """Self-normalised importance weights of log-ratios grouped by prompt.

    Parameters
    ----------
    log_r : array_like, float, shape [N] or [P, G]
        ℓ_i = log p1(x_i) − log p0(x_i), x_i ~ p0. 2-D: row p holds prompt p.
    group : array_like, shape [N], optional
        Prompt id of each row of a 1-D ``log_r`` (any sortable ids; ragged groups allowed,
        G_p ≥ 2). None: one prompt (1-D) or one prompt per row (2-D).
    scheme : {"none", "psis", "truncate", "clip"}
        Weighting scheme (module docstring).
    clip : float, optional
        The cap c on r for ``scheme="clip"``.

    Returns
    -------
    Weights
        ``w`` and ``log_w`` in the caller's row order and shape, normalised within each
        prompt; ``ess`` per prompt in sorted-id order; k̂ per tail fit.

    Notes
    -----
    w̄_i = r_i / Σ_{j∈p} r_j, ESS_p = 1/Σ_{i∈p} w̄_i² (Kong 1992); PSIS (Vehtari et al. 2024);
    truncation r ≤ mean(r)·√S (Ionides 2008).
    """
    inputs.check_options(scheme=scheme, clip=clip)
    shape, log_r, groups = inputs.layout(log_r, group, name="log_r")
    inputs.check_finite("log_r", log_r, "Score both models with the same sampling transform.")
    return weigh(groups.sort(log_r), groups, scheme, clip).in_caller_order(groups, shape)
