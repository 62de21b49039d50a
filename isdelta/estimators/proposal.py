"""The proposal q (DESIGN §5): rows drawn by a sampler that is not the engine's p0.

A fast sampler (vLLM) reports its own processed log-prob of each sampled token, log q; the engine
scores the same tokens under p0 and p1. Kernels, precision or a different transform make q ≠ p0,
so H0 is itself an importance-sampling estimate: within prompt p (mass 1/P),

    v̄_i = (p0/q)(x_i) / Σ_{j∈p} (p0/q)(x_j),   w̄_i = (p1/q)(x_i) / Σ_{j∈p} (p1/q)(x_j)
    H0 = −(1/P) Σ_p Σ_{i∈p} v̄_i S0_i,          H1 = −(1/P) Σ_p Σ_{i∈p} w̄_i S1_i

(``estimate(..., log_q=)``; ``estimate_tokens(..., token_logq=)`` uses the p0/q and p1/q prefix
ratios). This module holds what is specific to q: the diagnostics of the p0/q weights
(:class:`ProposalWeights`, a field of both results; their warnings are in ``diagnostics``) and
the sampler–scorer gap (:func:`sampler_gap`): how far the sampler's per-token log-probs are from the engine's, and how
many effective samples the p0/q weights leave. With q = p0 the gap is 0 and ESS/S = 1; per-token
gaps add up along a row: independent ones of 0.01 nats over 500 tokens spread log(p0/q) by
0.01·√500 ≈ 0.22.

Layout, stated once: token arrays [N, C], row arrays [N], per-prompt arrays [P] in sorted-id
order.

References
----------
Owen, A. B. (2013). Monte Carlo theory, methods and examples, §9.2 (self-normalised IS from
any proposal, its delta-method variance). https://artowen.su.domains/mc/
Kong, A. (1992). A note on importance sampling using standardized weights. Tech. rep. 348,
University of Chicago (ESS = 1/Σ w̄²).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.estimators import inputs
from isdelta.estimators.groups import Groups, make_groups
from isdelta.estimators.prefix import PrefixRows, prefix_ess, token_arrays
from isdelta.estimators.weights import Weights, ess_per_prompt, khat_threshold, normalize, pooled_ess, weigh
from isdelta.outputs import finite_or_none

__all__ = ["GAP_ESS", "GAP_TOL", "PROPOSAL_ESS", "ProposalWeights", "SamplerGap", "sampler_gap", "token_proposal"]

GAP_TOL = 0.01  # nats: a per-token |log q − log p0| above this is a real difference, not rounding
GAP_ESS = 0.9  # the gap warns below this pooled ESS/S of p0/q (10 % of the samples lost to q ≠ p0)
# The headline policy's floor on the pooled ESS/S of p0/q, and the warning's: set equal to the
# SNIS floor (policy.SNIS_ESS); not calibrated on ground truth, which has no run with q ≠ p0.
PROPOSAL_ESS = 0.5


@dataclass(frozen=True)
class ProposalWeights:
    """Diagnostics of the p0/q weights v̄ of an estimate with a proposal q (the H0 weights).

    Attributes
    ----------
    ess, ess_frac : float
        Pooled ESS = P² / Σ_p 1/ESS_p of the weights used, and ESS / N.
    ess_min, ess_frac_min : float
        The smallest per-prompt ESS_p = 1/Σ_{i∈p} v̄_i², and the smallest ESS_p / G_p.
    khat, khat_threshold : float
        Worst Pareto k̂ of the raw p0/q ratios over tail fits (nan: not estimable, e.g. fewer
        than 25 rows or q = p0 exactly) and the threshold min(1 − 1/log10 S, 0.7).
    mean_ratio_min, mean_ratio_max : float
        Range over prompts of mean_{i∈p} (p0/q)(x_i) (≈ 1 when q covers p0's support).
    kl : float
        KL(p0‖q) ≈ (1/P) Σ_p Σ_{i∈p} v̄_i log(p0/q)(x_i), nats.
    prefix_ess_frac_min : float or None
        Per-decision results only: the smallest per-(prompt, column) ESS / G_p of the p0/q
        prefix ratios over counted columns.
    weights_used : str
        The scheme applied to the p0/q ratios (the estimate's ``weights``; "none" per-decision).
    """

    ess: float
    ess_frac: float
    ess_min: float
    ess_frac_min: float
    khat: float
    khat_threshold: float
    mean_ratio_min: float
    mean_ratio_max: float
    kl: float
    prefix_ess_frac_min: float | None
    weights_used: str

    @classmethod
    def of(cls, wts: Weights, log_r0q: np.ndarray, groups: Groups, prefix_ess_frac_min: float | None = None):
        """From the p0/q weights used (prompt-sorted) and the raw log-ratios log(p0/q), [N]."""
        finite = np.isfinite(wts.khat)
        mean_ratio = groups.mean_exp(log_r0q)  # [P]
        ess = pooled_ess(wts.ess)
        return cls(
            ess=ess,
            ess_frac=ess / groups.n_rows,
            ess_min=float(wts.ess.min()),
            ess_frac_min=float(np.min(wts.ess / groups.sizes)),
            khat=float(wts.khat[finite].max()) if finite.any() else float("nan"),
            khat_threshold=float(khat_threshold(wts.fit_sizes.min())),
            mean_ratio_min=float(mean_ratio.min()),
            mean_ratio_max=float(mean_ratio.max()),
            kl=float(groups.sum(wts.w * log_r0q).mean()),
            prefix_ess_frac_min=prefix_ess_frac_min,
            weights_used=wts.scheme,
        )

    def to_dict(self) -> dict:
        """The fields, JSON-safe (non-finite numbers as None)."""
        out = {k: finite_or_none(v) for k, v in vars(self).items() if k != "weights_used"}
        out["weights_used"] = self.weights_used
        return out

    def __str__(self) -> str:
        prefix = "" if self.prefix_ess_frac_min is None else f"; prefix ESS/G min {self.prefix_ess_frac_min:.3f}"
        return (
            f"proposal q ≠ p0: ESS/S of p0/q {self.ess_frac:.3f} (per prompt min {self.ess_frac_min:.3f}); "
            f"k̂ {self.khat:.3f}; mean p0/q per prompt in [{self.mean_ratio_min:.4g}, {self.mean_ratio_max:.4g}]; "
            f"KL(p0‖q) {self.kl:.3g} nats{prefix}"
        )


def token_proposal(p0: PrefixRows) -> ProposalWeights:
    """ProposalWeights of per-decision rows' p0/q view (``PrefixRows.p0_view()``): the full
    sequence ratios log(p0/q) = log ρ0_{C−1} + δ0_{C−1}, raw, and the prefix ESS / G."""
    g = p0.groups
    log_r0q = p0.log_rho[:, -1] + p0.delta[:, -1]  # [N]
    ess, counted = prefix_ess(p0)  # [P, C] each
    frac = np.where(counted, ess, np.inf) / g.sizes[:, None]
    prefix_min = float(frac.min()) if counted.any() else float("nan")
    return ProposalWeights.of(weigh(log_r0q, g, "none", None), log_r0q, g, prefix_min)


@dataclass(frozen=True)
class SamplerGap:
    """How far the sampler's per-token log-probs are from the scorer's p0 (:func:`sampler_gap`).

    Attributes
    ----------
    mean_abs, max_abs : float
        Mean and largest |log q − log p0| over counted tokens, nats (nan with none counted).
    frac_over : float
        Fraction of counted tokens with |log q − log p0| > ``tol``.
    tol : float
        The per-token tolerance, nats.
    n_tokens : int
        Counted tokens.
    ess, ess_frac : float
        Pooled ESS = P² / Σ_p 1/ESS_p of the sequence weights p0/q (normalised per prompt),
        and ESS / N.
    ess_frac_min : float
        The smallest per-prompt ESS_p / G_p.
    ess_frac_prompt : tuple of float
        ESS_p / G_p of every prompt, in sorted prompt-id order.
    n_rows, n_prompts : int
    """

    mean_abs: float
    max_abs: float
    frac_over: float
    tol: float
    n_tokens: int
    ess: float
    ess_frac: float
    ess_frac_min: float
    ess_frac_prompt: tuple[float, ...]
    n_rows: int
    n_prompts: int

    @property
    def warning(self) -> str | None:
        """One line when the gap is large (mean |log q − log p0| > tol, or ESS/S < ``GAP_ESS``),
        else None."""
        if not (self.mean_abs > self.tol or self.ess_frac < GAP_ESS):
            return None
        return (
            f"sampler–scorer gap: mean |log q − log p0| {self.mean_abs:.3g} nats per token (max "
            f"{self.max_abs:.3g}; {self.frac_over:.1%} of tokens beyond {self.tol:g}), ESS/S of p0/q "
            f"{self.ess_frac:.3f}: the sampler is not p0, so H0 and H1 are importance-weighted by p0/q "
            "and p1/q; match the sampler's transform and precision (float32 logits) to the scorer's."
        )

    def to_dict(self) -> dict:
        """The fields and the warning (or None), JSON-safe: non-finite numbers as None."""
        out = {k: finite_or_none(v) for k, v in vars(self).items() if k not in ("ess_frac_prompt", "n_tokens")}
        out.update(n_tokens=self.n_tokens, n_rows=self.n_rows, n_prompts=self.n_prompts)
        out["ess_frac_prompt"] = [finite_or_none(v) for v in self.ess_frac_prompt]
        out["warning"] = self.warning
        return out


def sampler_gap(token_logq, token_logp0, mask, group=None, *, tol: float = GAP_TOL) -> SamplerGap:
    """The sampler–scorer gap: per-token |log q − log p0| and the ESS of the sequence weights p0/q.

    d_it = |log q(x_it) − log p0(x_it)| over counted positions (m_it = 1):

    - ``mean_abs`` = Σ m d / Σ m, ``max_abs`` = max over counted d, ``frac_over`` = share of
      counted d > ``tol``;
    - λ_i = Σ_t m_it (log p0 − log q)(x_it), v̄_i = e^{λ_i} / Σ_{j∈p} e^{λ_j} (log space),
      ESS_p = 1 / Σ_{i∈p} v̄_i² per prompt, pooled ESS = P² / Σ_p 1/ESS_p (Kong 1992).

    Naive equivalent: ``d = [abs(lq - l0) for lq, l0, m in zip(q, p0, mask) if m]``, then
    ``mean(d)``, ``max(d)``, ``mean(d > tol)``, and per prompt ``1 / sum(w**2)`` with
    ``w = exp(lam - logsumexp(lam))``.

    Parameters
    ----------
    token_logq : array_like, float, shape [N, C]
        The sampler's processed log-prob of each sampled token (vLLM's
        ``logprobs_mode="processed_logprobs"``), nats; counted positions are read only.
    token_logp0 : array_like, float, shape [N, C]
        The engine's p0 log-prob of the same tokens (``token_logp``), same transform.
    mask : array_like of bool or 0/1, shape [N, C]
        Counted positions (the stop token included, as the weights use).
    group : array_like, shape [N], optional
        Prompt id of each row (G_p ≥ 2); None: one prompt.
    tol : float
        Per-token tolerance for ``frac_over``, nats (default 0.01).

    Returns
    -------
    SamplerGap

    Raises
    ------
    ValueError
        Arrays not [N, C] alike, a non-finite or positive log-prob at a counted position (log q =
        −inf where p0 > 0 included), a mask that is not boolean or 0/1, a prompt with one row, or
        ``tol`` not a finite number ≥ 0.
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a per-token tolerance in nats (finite, ≥ 0), got {tol!r}.")
    arrays, m = token_arrays({"token_logp0": token_logp0, "token_logq": token_logq}, mask)
    codes, labels = inputs.group_codes(group, m.shape[0])
    groups = make_groups(codes, labels)
    inputs.check_group_sizes(groups)
    diff = np.where(m, arrays["token_logp0"] - arrays["token_logq"], 0.0)  # log p0/q, [N, C]
    d = np.abs(diff[m])  # counted tokens only, [n_tokens]
    lam = groups.sort(diff.sum(axis=1))  # λ_i, [N] sorted
    ess_p = ess_per_prompt(np.exp(normalize(lam, groups)), groups)  # [P]
    ess = pooled_ess(ess_p)
    frac_p = ess_p / groups.sizes
    return SamplerGap(
        mean_abs=float(d.mean()) if d.size else float("nan"),
        max_abs=float(d.max()) if d.size else float("nan"),
        frac_over=float(np.mean(d > tol)) if d.size else float("nan"),
        tol=float(tol),
        n_tokens=int(d.size),
        ess=ess,
        ess_frac=ess / groups.n_rows,
        ess_frac_min=float(frac_p.min()),
        ess_frac_prompt=tuple(float(v) for v in frac_p),
        n_rows=groups.n_rows,
        n_prompts=groups.n_prompts,
    )
