"""Standard errors by linearisation (influence functions), within and between prompts.

Every estimate here is a ratio of prompt averages,

    R = Σ_p Σ_{i∈p} w_i f_i  /  Σ_p Σ_{i∈p} w_i g_i,

with w either the uniform 1/G_p (expectations under p0) or the SNIS weights w̄ (under p1),
and g ≡ 1 for sequence-level quantities (then R = (1/P) Σ_p Σ_{i∈p} w_i f_i). Its first-order
(delta-method) expansion gives, per row and per prompt,

    ψ_i = r̃_i · (e_i − ē_p) / B,   e_i = f_i − R g_i,   ē_p = Σ_{i∈p} w_i e_i,
    z_p = ē_p / B,                 B = (1/P) Σ_p Σ_{i∈p} w_i g_i,   r̃_i = G_p w_i.

For H1 (g ≡ 1, f = −S1) this is DESIGN §5's r̃_i(−S1_i − H1_p); for H0 (r̃ ≡ 1) it is
−S0_i − H0_p. Differences (ΔH = H1 − H0) subtract the ψ and z of the two estimates row by
row, so the covariance between H1 and H0 (same samples) is counted: the paired influence
function. Standard errors:

- ``prompts="fixed"`` (the estimand is this prompt set): SE = √(Σ_p var_p(ψ)/G_p) / P.
- ``prompts="sampled"`` (prompts drawn from a population): SE = sd_p(z)/√P, which for a
  sequence-level mean is sd_p(ΔH_p)/√P, the between-prompt SE (it includes within-prompt noise).

var_p and sd_p use ddof = 1. With smoothed weights (PSIS, truncation, clip) ψ uses the weights
actually used: the SE is conditional on the smoothing, as in PSIS's own MCSE.

References
----------
Hesterberg, T. (1995). Weighted average importance sampling and defensive mixture
distributions. Technometrics 37(2):185-194. https://doi.org/10.1080/00401706.1995.10484303
Owen, A. B. (2013). Monte Carlo theory, methods and examples, §9.2 (SNIS delta-method
variance). https://artowen.su.domains/mc/
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.estimators.groups import Groups

__all__ = [
    "Linear",
    "covariance",
    "fixed_standard_error",
    "standard_error",
    "weighted_covariance",
    "weighted_ratio",
    "z_value",
]


@dataclass(frozen=True)
class Linear:
    """An estimate with its linearisation: value, ψ [N] (sorted rows), z [P]."""

    value: float
    psi: np.ndarray
    z: np.ndarray

    def __sub__(self, other: Linear) -> Linear:
        return Linear(self.value - other.value, self.psi - other.psi, self.z - other.z)

    def __add__(self, other: Linear) -> Linear:
        return Linear(self.value + other.value, self.psi + other.psi, self.z + other.z)


def weighted_ratio(w: np.ndarray, f: np.ndarray, g: np.ndarray | None, groups: Groups) -> Linear:
    """R = Σ_p Σ_{i∈p} w_i f_i / Σ_p Σ_{i∈p} w_i g_i and its linearisation (module docstring).

    ``w`` must sum to 1 within each prompt; ``g=None`` means g ≡ 1 (a prompt-average).
    """
    a = groups.sum(w * f)  # [P]
    b = np.ones_like(a) if g is None else groups.sum(w * g)  # [P]
    big_b = b.mean()
    value = a.mean() / big_b
    e_bar = a - value * b  # [P], Σ_{i∈p} w_i e_i
    # ψ = r̃ (e − ē_p) / B with r̃ = G_p w (1 for uniform weights) and e = f − R g, built in
    # place: each [N] temporary of a 10^6-row estimate costs a page-faulted allocation
    psi = f - value if g is None else f - value * g  # e, [N]
    psi -= groups.expand(e_bar)
    psi *= w
    psi *= groups.row_sizes
    psi /= big_b
    return Linear(float(value), psi, e_bar / big_b)


def covariance(x: np.ndarray, y: np.ndarray, groups: Groups, *, x_centred: np.ndarray | None = None) -> Linear:
    """(1/P) Σ_p Cov_p(x, y) with the unbiased (ddof = 1) within-prompt covariance.

    ψ_i = (x_i − x̄_p)(y_i − ȳ_p) − mean_p of the same, the influence term of a sample
    covariance (its O(1/G) correction is ignored in the SE). ``x_centred``: x − x̄_p when the
    caller has it already.
    """
    shaped, per_row = groups.shaped, groups.per_row  # [P, G] views and [P, 1] when G is equal
    xc = shaped(x) - per_row(groups.mean(x)) if x_centred is None else shaped(x_centred)
    yc = shaped(y) - per_row(groups.mean(y))
    with np.errstate(over="ignore", invalid="ignore"):  # deviations past 1e154: ±inf / nan, as it is
        u = (xc * yc).reshape(-1)  # [N]
        cov_p = groups.sum(u) / (groups.sizes - 1)  # [P]
        value = float(cov_p.mean())
        psi = shaped(u) - per_row(groups.mean(u))
        return Linear(value, psi.reshape(-1), cov_p - value)


def weighted_covariance(x: np.ndarray, y: np.ndarray, w: np.ndarray, groups: Groups) -> Linear:
    """(1/P) Σ_p C_p, C_p = Σ_{i∈p} w_i (x_i − x̄_p)(y_i − ȳ_p) / (1 − Σ_{i∈p} w_i²), x̄_p = Σ w x.

    The self-normalised covariance under the distribution that ``w`` (summing to 1 in each
    prompt) reweights to; 1 − Σ w² is the reliability-weights correction, so w = 1/G_p gives
    :func:`covariance` (ddof = 1) up to rounding. ψ_i = G_p w_i (u_i − Σ_{j∈p} w_j u_j),
    u = (x − x̄)(y − ȳ): the SNIS influence term (the estimated means add nothing at first
    order, E[x − x̄] = 0; the O(1/G) correction is ignored, as in :func:`covariance`).
    """
    xc = x - groups.expand(groups.sum(w * x))
    yc = y - groups.expand(groups.sum(w * y))
    with np.errstate(over="ignore", invalid="ignore"):  # deviations past 1e154: ±inf / nan, as it is
        lin = weighted_ratio(w, xc * yc, None, groups)  # ddof-0 value, SNIS influence ψ
        cov_p = groups.sum(w * xc * yc) / (1.0 - groups.sum(w * w))  # [P]
        value = float(cov_p.mean())
        return Linear(value, lin.psi, cov_p - value)


def standard_error(lin: Linear, groups: Groups, prompts: str) -> float:
    """SE of a linearised prompt-average; ``prompts`` is "fixed" or "sampled" (module doc)."""
    n_prompts = groups.n_prompts
    # an influence term past 1e154 (a ratio whose denominator nearly cancels, after a huge step)
    # squares to inf, and inf − inf is nan: the SE is then not finite, which every reader checks
    with np.errstate(over="ignore", invalid="ignore"):
        if prompts == "sampled":
            return float(np.std(lin.z, ddof=1) / np.sqrt(n_prompts))
        psi = lin.psi
        return fixed_standard_error(groups.sum(psi * psi), groups.sum(psi), groups.sizes)


def fixed_standard_error(sum_sq: np.ndarray, sum_: np.ndarray, sizes: np.ndarray) -> float:
    """SE = √(Σ_p var_p(ψ)/G_p)/P (``prompts="fixed"``) from Σ_{i∈p} ψ_i² and Σ_{i∈p} ψ_i, [P] each."""
    # ψ sums to 0 within each prompt (centred by construction: Σ_{i∈p} w_i (e_i − ē_p) = 0),
    # so the one-pass form Σψ² − (Σψ)²/G loses no digits here and saves [N] temporaries
    with np.errstate(over="ignore", invalid="ignore"):  # see standard_error
        var_p = (sum_sq - sum_**2 / sizes) / (sizes - 1)  # [P]
        return float(np.sqrt(np.sum(np.maximum(var_p, 0.0) / sizes)) / sizes.shape[0])


def z_value(level: float) -> float:
    """Two-sided normal quantile z_{(1+level)/2}; ``scipy.special.ndtri`` is norm.ppf.

    Normal rather than t: the estimators are asymptotically normal in the number of rows, and
    no single degrees-of-freedom count fits both the fixed (Σ_p (G_p − 1)) and the sampled
    (P − 1) SE. With prompts="sampled" and few prompts (P < 30) the interval is optimistic.
    """
    from scipy.special import ndtri

    return float(ndtri(0.5 + level / 2.0))
