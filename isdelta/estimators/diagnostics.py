"""Diagnostics (SNIS: ESS, k̂, KL, mean ratio, lengths; per decision: prefix ESS, prefix ratios,
physical bounds) and the warnings they trigger.

Each warning says what was measured, why it matters for the entropy estimate, and what to do.

References
----------
Vehtari, A. et al. (2024). Pareto smoothed importance sampling. JMLR 25(72). (k̂, S_min)
Chatterjee, S., Diaconis, P. (2018). The sample size required in importance sampling.
Ann. Appl. Probab. 28(2):1099-1135. https://doi.org/10.1214/17-AAP1326 (S ≈ exp(KL))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from isdelta.estimators.groups import Groups
from isdelta.estimators.inputs import Rows
from isdelta.estimators.moments import row_sums
from isdelta.estimators.policy import Check, bounds
from isdelta.estimators.prefix import LOG_MAX, PrefixRows, prefix_ess
from isdelta.estimators.proposal import PROPOSAL_ESS, ProposalWeights
from isdelta.estimators.results import KHAT_ESS_GATE, Estimate
from isdelta.estimators.weights import Weights, khat_threshold, min_sample_size, pooled_ess

__all__ = [
    "ESS_FRAC_MIN",
    "KHAT_ESS_GATE",
    "RATIO_RANGE",
    "PerPrompt",
    "bounds_warning",
    "broken_bounds",
    "collect_warnings",
    "diagnose",
    "proposal_warnings",
    "token_diagnostics",
    "token_warnings",
]

RATIO_RANGE = (0.5, 2.0)  # mean r per prompt outside this: missed mass / different support
ESS_FRAC_MIN = 0.1  # pooled ESS / N below this: a handful of rows carry the estimate


def _ratio_mean(x: np.ndarray, w: np.ndarray, keep: np.ndarray, groups: Groups) -> float:
    """(1/P') Σ_p Σ_{i∈p, keep} w_i x_i / Σ_{i∈p, keep} w_i over the P' prompts with mass."""
    if keep.all():  # the usual case: every row counts (w sums to 1 in each prompt)
        return float(np.mean(groups.sum(w * x)))
    wk = np.where(keep, w, 0.0)
    mass = groups.sum(wk)
    ok = mass > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(groups.sum(wk * np.where(keep, x, 0.0))[ok] / mass[ok]))


@dataclass(frozen=True)
class PerPrompt:
    """The per-prompt diagnostics behind both the result's fields and the warnings (computed once).

    kl : KL_p(p1‖p0) ≈ Σ_{i∈p} w̄_i ℓ_i, [P].
    mean_ratio : mean_{i∈p} r_i of the raw ratios, [P] (log-space mean, then exp); with a
        proposal q, of the H1 weights' ratios p1/q (1 in expectation under q).
    """

    kl: np.ndarray
    mean_ratio: np.ndarray

    @classmethod
    def of(cls, rows: Rows, wts: Weights, kl: np.ndarray | None = None) -> PerPrompt:
        """``kl`` when the caller has it; the mean ratio from ``wts`` when it carries it."""
        g = rows.groups
        log_r = rows.log_r if rows.log_r1q is None else rows.log_r1q
        kl = g.sum(wts.w * rows.log_r) if kl is None else kl
        return cls(kl, g.mean_exp(log_r) if wts.mean_ratio is None else wts.mean_ratio)


def diagnose(rows: Rows, wts: Weights, pp: PerPrompt, u: np.ndarray | None = None, sums: dict | None = None) -> dict:
    """The diagnostic fields of :class:`EntropyDelta` (floats and ints); ``u`` the within-prompt
    weights of expectations under p0 (None: uniform, the rows are p0's own samples); ``sums``
    those of ``moments.row_sums`` when the caller has them."""
    g = rows.groups
    kl_p, mean_ratio = pp.kl, pp.mean_ratio
    finite = np.isfinite(wts.khat)
    worst = float(np.max(wts.khat[finite])) if finite.any() else float("nan")
    means = _row_means(row_sums(rows, wts.w, u, covariance=False) if sums is None else sums)
    if means["n_empty"]:  # rows with L = 0: per-token NLLs over the others
        u = g.uniform if u is None else u
        nonempty = rows.length > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            means["nll0_tok"] = _ratio_mean(-rows.s0 / rows.length, u, nonempty, g)
            means["nll1_tok"] = _ratio_mean(-rows.s1 / rows.length, wts.w, nonempty, g)
    ess = pooled_ess(wts.ess)
    return {
        "kl": float(kl_p.mean()),
        "kl_max": float(kl_p.max()),
        "g_min": int(g.sizes.min()),
        "ess": ess,
        "ess_min": float(wts.ess.min()),
        "ess_mean": float(wts.ess.mean()),
        "ess_frac": ess / g.n_rows,
        "khat": worst,
        "khat_threshold": float(khat_threshold(wts.fit_sizes.min())),
        "s_min": min_sample_size(worst),
        "mean_ratio_min": float(mean_ratio.min()),
        "mean_ratio_max": float(mean_ratio.max()),
        **means,
        "n_rows": g.n_rows,
        "n_prompts": g.n_prompts,
    }


def _row_means(sums: dict) -> dict:
    """mean_length = mean_p Σ u L, nll0_tok = mean_p Σ u (−S0/L), nll1_tok = mean_p Σ w̄ (−S1/L)
    (``_ratio_mean``'s usual case, every row with L > 0), no_stop_frac and n_empty, from
    ``moments.row_sums``."""
    out = {
        "mean_length": float(sums["u.length"].mean()),
        "nll0_tok": -float(sums["u.s0/length"].mean()),  # (sums of S/L: negated exactly)
        "nll1_tok": -float(sums["w.s1/length"].mean()),
        "no_stop_frac": float(sums["u.stopped"].mean()) if "u.stopped" in sums else None,
    }
    return out | {"n_empty": sums["n_empty"]}


def _khat_warnings(wts: Weights, d: dict) -> list[str]:
    where = "per prompt" if wts.per_prompt else "pooled over all rows"
    n_fits = wts.khat.shape[0]
    out = []
    thr = khat_threshold(wts.fit_sizes.astype(float))
    finite = np.isfinite(wts.khat)
    bad = finite & (wts.khat > thr)
    worst = float(wts.khat[finite].max()) if finite.any() else float("nan")
    # with the weights spread evenly (ESS/S ≥ the gate) a high k̂ is a noisy fit, not a tail
    bad &= d["ess_frac"] < KHAT_ESS_GATE
    if bad.any() and worst > 1.0:
        out.append(
            f"k̂ = {worst:.2f} > 1 (very bad) and ESS/S = {d['ess_frac']:.2f} < {KHAT_ESS_GATE}: the "
            "ratio r = p1/p0 looks like it has no finite mean under p0, so SNIS estimates of H1 and ΔH "
            "are unreliable at any sample size: p1 puts mass where p0 almost never samples "
            f"({int(bad.sum())} of {n_fits} tail fits, {where}). Fix: a smaller update step."
        )
    elif bad.any():
        s_fit = int(wts.fit_sizes.min())
        out.append(
            f"k̂ = {worst:.2f} is above the sample-size threshold min(1 − 1/log10 S, 0.7) "
            f"(= {float(thr[bad].min()):.2f} for S = {s_fit}: the largest k̂ at which a tail fit "
            f"on S draws still gives a reliable estimate), and ESS/S = {d['ess_frac']:.2f} < "
            f"{KHAT_ESS_GATE}: a few heavy weights carry the estimate, and its SE understates the "
            f"error. About S_min = 10^(1/(1−k̂)) ≈ {min_sample_size(worst):.3g} samples per fit "
            f"would be needed ({int(bad.sum())} of {n_fits} tail fits, {where}). Fix: a smaller "
            "update step, more samples per prompt, or compare weights='truncate'."
        )
    unknown = ~finite & ~wts.constant
    if unknown.any():
        out.append(
            f"k̂ not estimable for {int(unknown.sum())} of {n_fits} tail fits ({where}; a fit "
            f"needs ≥ 25 rows and ≥ 5 distinct values in the largest log-ratios): the weights' "
            "tail is unchecked, which is not the same as good. Rely on ESS, and sample ≥ 25 "
            "completions per prompt for a per-prompt k̂."
        )
    return out


def _ess_warning(d: dict) -> list[str]:
    if not d["ess_frac"] < ESS_FRAC_MIN:
        return []
    return [
        f"ESS/S = {d['ess_frac']:.3f} < {ESS_FRAC_MIN} (pooled ESS {d['ess']:.1f} of "
        f"{d['n_rows']} rows; smallest per-prompt ESS {d['ess_min']:.1f}): a few rows carry most "
        "of the weight, so H1 and ΔH rest on them and the SE is itself unreliable. Fix: a "
        "smaller update step or more samples per prompt."
    ]


def _kl_warning(rows: Rows, kl_p: np.ndarray) -> list[str]:
    short = rows.groups.sizes < np.exp(np.minimum(kl_p, 700.0))
    if not short.any():
        return []
    return [
        f"S < exp(KL): {int(short.sum())} of {rows.groups.n_prompts} prompts have fewer samples "
        f"than exp(KL(p1‖p0)) (largest per-prompt KL {kl_p.max():.3g} nats, "
        f"exp = {np.exp(min(kl_p.max(), 700.0)):.3g}); importance sampling needs about exp(KL) "
        "samples to reach where p1 puts its mass (Chatterjee & Diaconis 2018), so H1 is "
        "likely biased. Fix: a smaller update step or more samples per prompt."
    ]


def _ratio_warning(rows: Rows, ratio: np.ndarray) -> list[str]:
    lo, hi = RATIO_RANGE
    off = (ratio < lo) | (ratio > hi)
    if not off.any():
        return []
    return [
        f"mean ratio r = p1/p0 outside [{lo:g}, {hi:g}] for {int(off.sum())} of "
        f"{rows.groups.n_prompts} prompts (range [{ratio.min():.3g}, {ratio.max():.3g}]). Under "
        "p0's samples E[r] = 1 when both models are normalised on the same support: far below "
        "1 means p1 has mass p0's samples missed (a different support, e.g. differing top-k/"
        "top-p kept sets, or a tail too heavy for this sample size); far above 1 means log_p1 "
        "is not a normalised log-prob (different temperature or truncation). H1 on those "
        "prompts is biased. Fix: score both models with the same transform; take a smaller step."
    ]


def _empty_warning(d: dict) -> list[str]:
    if d["n_empty"] == 0:
        return []
    return [
        f"{d['n_empty']} of {d['n_rows']} rows have L = 0 (no counted tokens, e.g. an "
        "immediate EOS with include='no_eos'): they add 0 to S and L, so they count as zero "
        "entropy; check the completion mask if this is unexpected."
    ]


def collect_warnings(rows: Rows, wts: Weights, d: dict, pp: PerPrompt) -> list[str]:
    """Every diagnostic warning for one estimate, in a fixed order."""
    return [
        *_khat_warnings(wts, d),
        *_ess_warning(d),
        *_kl_warning(rows, pp.kl),
        *_ratio_warning(rows, pp.mean_ratio),
        *_empty_warning(d),
    ]


def proposal_warnings(pw: ProposalWeights) -> list[str]:
    """Warnings on the p0/q weights: few effective samples, or a mean ratio far from 1."""
    out = []
    frac = pw.ess_frac if pw.prefix_ess_frac_min is None else min(pw.ess_frac, pw.prefix_ess_frac_min)
    if frac < PROPOSAL_ESS:
        out.append(
            f"ESS/S of the proposal weights p0/q = {frac:.3f} < {PROPOSAL_ESS} (k̂ {pw.khat:.2f}, KL(p0‖q) "
            f"{pw.kl:.3g} nats): the sampler q is far from the scorer's p0, so H0 as well as H1 rests on "
            "few rows. Fix: sample with the scoring transform (temperature, top-k, top-p) and precision "
            "(float32 logits), or sample from p0 itself (the HF back end)."
        )
    lo, hi = RATIO_RANGE
    if pw.mean_ratio_min < lo or pw.mean_ratio_max > hi:
        out.append(
            f"mean ratio p0/q per prompt in [{pw.mean_ratio_min:.3g}, {pw.mean_ratio_max:.3g}], outside "
            f"[{lo:g}, {hi:g}]: under q it is 1 only when q covers p0's support; far below 1, p0 has mass "
            "the sampler never draws (a narrower top-k/top-p kept set?) and H0, H1 are biased. Fix: "
            "sample with the same transform as the scorer."
        )
    return out


# ---------------------------------------------------------------------------- per decision
def broken_bounds(ests: dict[str, Estimate], support_size: int | None, max_length: int) -> list[Check]:
    """The physical bounds (``policy.bounds``) that the point estimates break: a value on the wrong
    side, ±inf included; not a nan (no counted position: nothing to estimate, not an impossible
    number) and not the finiteness check (the other warnings say why an SE is infinite)."""
    checks = bounds(SimpleNamespace(**ests), support_size, max_length)[:-1]  # [-1]: ΔH and its SE finite
    broken = []
    for c in checks:
        if math.isnan(c.value) or math.isnan(c.threshold):
            continue
        if not (c.value >= c.threshold if c.op == "≥" else c.value <= c.threshold):
            broken.append(c)
    return broken


def bounds_warning(method: str, broken: list[Check], d: dict) -> str:
    """The warning of a per-decision result whose point estimates break physical bounds."""
    if method == "pd_sn":  # a weighted mean of the entropies given: only they can break a bound
        why = (
            "pd_sn averages the token entropies given, so they break it: check token_entropy0/1 "
            "(and support_size) against the model's vocabulary."
        )
    else:
        why = (
            f"{method} weighs positions by prefix ratios up to e^{d['max_log_rho']:.3g} and relies on "
            "E_p0[ρ] = 1, which fails on this sample. Fix: a smaller update step, or method='pd_sn' "
            "(bounded by the data)."
        )
    return (
        f"{method}: estimates outside the physical bounds of entropy: {'; '.join(map(str, broken))}. No model "
        f"has such entropies, and headline() refuses {method} here (these bounds are among its checks); "
        f"{why}"
    )


def token_diagnostics(tok: PrefixRows) -> dict:
    """A per-decision result's diagnostics: prefix-weight ESS, largest |log ρ|, mean full-sequence
    ratio, sizes."""
    g = tok.groups
    ess, counted = prefix_ess(tok)
    ess_counted = np.where(counted, ess, np.inf)
    frac = ess_counted / g.sizes[:, None]
    log_r = tok.log_rho[:, -1] + tok.delta[:, -1]  # full-sequence log-ratio, [N]
    mean_ratio = g.mean_exp(log_r)  # [P]
    any_counted = bool(counted.any())
    return {
        "prefix_ess_min": float(ess_counted.min()) if any_counted else float("nan"),
        "prefix_ess_frac_min": float(frac.min()) if any_counted else float("nan"),
        "max_log_rho": float(max(np.abs(tok.log_rho).max(), np.abs(log_r).max())),
        "mean_ratio_min": float(mean_ratio.min()),
        "mean_ratio_max": float(mean_ratio.max()),
        "n_rows": g.n_rows,
        "n_prompts": g.n_prompts,
        "n_empty": int(np.sum(tok.mask.sum(axis=1) == 0)),
    }


def _prefix_ess_warning(d: dict, tok: PrefixRows) -> list[str]:
    g = tok.groups
    ess, counted = prefix_ess(tok)
    low = counted & (ess < np.maximum(2.0, ESS_FRAC_MIN * g.sizes[:, None]))
    if not low.any():
        return []
    first = int(np.argwhere(low)[:, 1].min())
    message = (
        f"prefix-weight ESS below max(2, {ESS_FRAC_MIN}·G) at {int(low.sum())} counted "
        f"(prompt, column) pairs of {int(low.any(axis=1).sum())} prompts, from column {first} "
        f"(smallest ESS {d['prefix_ess_min']:.2f}; largest |log ρ| {d['max_log_rho']:.3g}): "
        "the prefix ratios of later positions rest on one or two rows, so H1 and ΔH there, "
        "and their SE, are unreliable. Fix: a smaller update step or more samples per prompt."
    )
    return [message]


def token_warnings(d: dict, tok: PrefixRows) -> list[str]:
    """Every diagnostic warning of one per-decision estimate, in a fixed order."""
    out = _prefix_ess_warning(d, tok)
    top = max(tok.log_rho.max(), (tok.log_rho + tok.delta).max())
    if top > LOG_MAX:
        out.append(
            f"prefix ratios up to e^{top:.4g}: pd and cv weigh positions by them, so their "
            "per-sequence H1 and ΔH are unbounded here (±inf when past float64; the per-token rates stay "
            "finite). E_p0[ρ] = 1 fails on this sample. Fix: a smaller update step, or method='pd_sn' "
            "(bounded by the data)."
        )
    lo, hi = RATIO_RANGE
    if d["mean_ratio_min"] < lo or d["mean_ratio_max"] > hi:
        out.append(
            f"mean full-sequence ratio r = p1/p0 per prompt in [{d['mean_ratio_min']:.3g}, "
            f"{d['mean_ratio_max']:.3g}], outside [{lo:g}, {hi:g}]: the per-decision "
            "estimators rely on E_p0[ρ_t] = 1, which fails when p1 has mass that p0's samples "
            "missed or the two are scored with different transforms. Fix: score both models "
            "with the same sampling transform; take a smaller step."
        )
    if d["n_empty"]:
        out.append(
            f"{d['n_empty']} of {d['n_rows']} rows have no counted position (L = 0): they add "
            "0 to every sum and count as zero entropy; check the mask if this is unexpected."
        )
    return out
