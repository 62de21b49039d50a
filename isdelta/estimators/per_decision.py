"""Per-decision estimators: ``estimate_tokens``, ΔH from per-position scores, prefix ratios and a
control variate.

Sequence-level SNIS (``estimate``) weights every position of a row by the ratio of the *whole*
sequence. Entropy is a sum over positions and position t's term depends only on its prefix,
so it needs only the *prefix* ratio (per-decision importance sampling), and the exact
next-token entropy H_t can replace −log p(x_t) (Rao–Blackwellisation). Layout, stated once:
token arrays are [N, C] (rows × completion columns), rows sorted prompt-major inside.

Per row i and column t (DESIGN §3 masks; m_it = 1 on counted positions):

    δ_it = (log p1(x_it) − log p0(x_it)) · m_it        per-token log-ratio, 0 where not counted
    log ρ_it = Σ_{s<t} δ_is                            prefix log-ratio (fixed after the stop)
    a_it = m_it · H_it                                 entropy contribution (H0 or H1)

E_p0[ρ_it] = 1 for every t (over all rows, stopped ones included): ρ_t is the likelihood ratio
of the first t tokens (of the whole sequence once the row has stopped). Since m_it and H_it are
functions of the prefix, E_p0[ρ_it a1_it] = E_p1[m_t H1_t], and Σ_t of that is H(p1) by the
chain rule of entropy, when the mask counts the stop token (the engine's default).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np

from isdelta.estimators import inputs
from isdelta.estimators.diagnostics import (
    bounds_warning,
    broken_bounds,
    proposal_warnings,
    token_diagnostics,
    token_warnings,
)
from isdelta.estimators.groups import Groups
from isdelta.estimators.prefix import LOG_MAX, PrefixRows, expand, prepare, sn_weights
from isdelta.estimators.proposal import token_proposal
from isdelta.estimators.psis import MIN_TAIL_FIT, psis
from isdelta.estimators.results import TOKEN_ESTIMATES as ESTIMATES
from isdelta.estimators.results import Estimate, EstimatorWarning, TokenDelta
from isdelta.estimators.uncertainty import Linear, standard_error, z_value

__all__ = ["METHODS", "TokenDelta", "estimate_tokens"]

Method = Literal["cv", "pd", "pd_sn"]
METHODS: tuple[str, ...] = ("cv", "pd", "pd_sn")
BETA = {
    "cv": (
        "doubly robust, β = 1: Σ_t m_t·û_t·(ρ_{t+1} − ρ_t), û_t = mean remaining entropy "
        "Σ_{s>t} m_s H1_s of the prompt's OTHER rows still generating at t (leave-one-out, "
        "no regression)"
    ),
    "pd": "none (plain per-decision estimator, no control variate)",
    "pd_sn": "none (per-position self-normalisation ρ_t / mean_{j∈p} ρ_jt)",
}


def estimate_tokens(
    token_logp0,
    token_logp1,
    token_entropy0,
    token_entropy1,
    mask,
    group=None,
    *,
    method: Method = "cv",
    prompts: Literal["fixed", "sampled"] = "fixed",
    level: float = 0.95,
    token_logq=None,
    support_size: int | None = None,
) -> TokenDelta:
    r"""Estimate H(p0), H(p1), ΔH and entropy rates with per-decision Rao–Blackwellised IS.

    Rows x_i ~ p0 are scored position by position under both models (module docstring for
    δ, ρ and a = m·H). Within prompt p (each prompt has mass 1/P):

    - H0 = mean_i Σ_t m_it H0_it (exact next-token entropies on p0's own paths)
    - ``"pd"`` (per-decision, unbiased): H1 = mean_i Σ_t ρ_it m_it H1_it
    - ``"cv"`` (unbiased): H1 = mean_i [Σ_t ρ_it m_it H1_it − Σ_t m_it û_it (ρ_i,t+1 − ρ_it)]
      with û_it the mean remaining entropy Σ_{s>t} m_js H1_js over the prompt's other rows j
      still generating at t (leave-one-out). ρ_{t+1} − ρ_t = ρ_t (e^{δ_t} − 1) has mean 0
      given the prefix, so any prefix function times it is a zero-mean control; this one is
      the doubly robust estimator with the value function "expected remaining entropy, given
      the row is still generating at t" (Notes: why this control and β = 1).
    - ``"pd_sn"`` (consistent, O(1/G) bias): ρ_it replaced by ρ_it / mean_{j∈p} ρ_jt.
    - ``*_tok``: the same numerators over Σ_p E[L] (L = Σ_t m_t, with ρ / the control for p1).
    - ΔH = H1 − H0, direct = mean_i Σ_t m_it (H1_it − H0_it), path_shift = ΔH − direct.

    With ``token_logq`` (rows drawn from a proposal q ≠ p0), δ and ρ are the p1/q log-ratios and
    every expectation under p0 (H0, the p0 length, ``direct``) is the same ``method`` applied to
    the p0/q prefix ratios ρ0_it = exp Σ_{s<t} m_is (log p0 − log q)(x_is): "pd" gives
    H0 = mean_i Σ_t ρ0_it m_it H0_it (unbiased, E_q[ρ0_t f(prefix)] = E_p0[f]), "cv" adds its
    control with û from a0, "pd_sn" self-normalises ρ0 per column. One method for both sides
    keeps the q = p0 case exact (ρ0 ≡ 1 reproduces the plain means bit for bit) and the pairing
    of H1 and H0 in ΔH's SE (ψ = ψ1 − ψ0 row by row, each the method's own influence term).

    Parameters
    ----------
    token_logp0, token_logp1 : array_like, float, shape [N, C]
        log p(x_it | prefix) of the sampled token under p0 (the sampler) and p1, in nats.
        Only counted positions are read: anything (even nan) may sit elsewhere.
    token_entropy0, token_entropy1 : array_like, float, shape [N, C]
        Entropy of the full next-token distribution at each position under p0 and p1 (the
        engine's ``token_entropy``); counted positions only are read.
    mask : array_like of bool or 0/1, shape [N, C]
        Counted positions. It must count the stop token (``include_eos=True``, as the engine
        scores): every sampled token must enter the prefix ratio, and the chain rule then makes
        Σ_t H_t an unbiased estimate of the sequence entropy.
    group : array_like, shape [N], optional
        Prompt id of each row (ragged G allowed, G_p ≥ 2); None: one prompt.
    method : {"cv", "pd", "pd_sn"}
        Estimator of the p1 terms (above); H0 and ``direct`` are the same for all three.
    prompts : {"fixed", "sampled"}
        SE mode as in ``estimate``: within-prompt (√(Σ_p var_p(ψ)/G_p)/P) or between-prompt.
    level : float in (0, 1)
        Coverage of the normal confidence intervals.
    token_logq : array_like, float, shape [N, C], optional
        The sampler's processed log-prob of each sampled token (counted positions read only).
        None (default): the rows come from p0 and the result is exactly what it is without it.
    support_size : int, optional
        Tokens a next-token distribution can spread over (the vocabulary, or top-k), for the
        physical bounds: per token H ≤ ln V, per sequence H ≤ C·ln V. None: 2^32
        (``policy.SUPPORT_MAX``); the estimates themselves do not use it.

    Returns
    -------
    TokenDelta
        With ``max_length`` = C and ``out_of_bounds``: the physical bounds of entropy that the
        estimates break (``policy.bounds``: H ≥ 0, ΔH ≥ −H0, the two above), empty when none.

    Raises
    ------
    ValueError
        Arrays not [N, C] alike, non-finite or positive log-probs / negative entropies at
        counted positions (``token_logq`` included: q drew them), a mask that is not boolean or
        0/1, a prompt with one row, an unknown ``method`` or ``prompts``, ``level`` outside (0, 1),
        ``support_size`` < 1.
    TypeError
        ``method``, ``prompts`` not strings, ``level`` not a number, ``support_size`` not an int.

    Warns
    -----
    EstimatorWarning
        Prefix-weight ESS below max(2, 0.1·G_p) at some counted column, prefix ratios past
        e^300, a prompt's mean ratio outside [0.5, 2], rows with L = 0, and any estimate outside
        the physical bounds of entropy (which ``headline`` refuses).

    Notes
    -----
    The control. The exact value function V_{t+1}(x_≤t) (p1's expected remaining entropy)
    would make the "cv" estimate exact; the engine's arrays carry no per-position p1(stop), so
    V is approximated by a function of the prefix only: m_it û_it, one number per (prompt,
    column) learnt from the other rows. Using m_it (stopped rows add nothing after their stop)
    is what matters on real scores: the issue's row-independent form Σ_t b_t (ρ_it − 1),
    b_t ≈ E[m_t H1_t], leaves stopped rows adding b_t (r_i − 1) at every later column (SE 0.73
    vs 0.46 nats on the SmolLM2 demo, pd 0.98). A regression-fitted multiplier of the control
    (2-fold cross-fitting, pooled over prompts) changed the toy SD by −11 % to +12 % (worst at
    G = 8) and the demo SE by +1 %, and a per-column β_t fitted on the sample overfits (bias up
    to 1.5 SD on a depth-8 toy), so β = 1 is fixed: nothing is fitted on row i's own data,
    hence no cross-fitting is needed and no bias arises.

    Unbiasedness of "pd" and "cv" needs E_p0[e^{δ_t} | prefix] = 1, i.e. both models scored
    on the same support (same temperature / top-k / top-p); the mean-ratio warning checks it.

    SEs use per-row influence terms (uncertainty.py): for "pd" and "cv" the per-row values
    are (nearly, for "cv": the leave-one-out baseline adds an O(1/G) dependence) i.i.d. within
    a prompt; "pd_sn" and the rates are linearised. The pairing of H1 and H0 (same rows) is
    kept in ΔH's SE. p1 = p0 gives ΔH = 0 exactly with SE 0, for every method.

    References
    ----------
    Precup, D., Sutton, R. S., Singh, S. (2000). Eligibility traces for off-policy policy
    evaluation. ICML, 759-766 (per-decision importance sampling).
    Jiang, N., Li, L. (2016). Doubly robust off-policy value evaluation for reinforcement
    learning. ICML, PMLR 48:652-661. https://proceedings.mlr.press/v48/jiang16.html
    Owen, A. B. (2013). Monte Carlo theory, methods and examples, ch. 8-9 (control variates,
    SNIS). https://artowen.su.domains/mc/
    """
    _check_method(method)
    inputs.check_options(prompts=prompts, level=level)
    inputs.check_support_size(support_size)
    tok = prepare(token_logp0, token_logp1, token_entropy0, token_entropy1, mask, group, token_logq)
    if prompts == "sampled" and tok.groups.n_prompts < 2:
        raise ValueError(
            "prompts: 'sampled' needs at least 2 prompts for a between-prompt SE, got 1; use "
            "prompts='fixed' or pass `group`."
        )
    lins, shift = _estimates(tok, method)
    z = z_value(level)
    ests = {
        k: _estimate(lin, standard_error(lin, tok.groups, prompts), level, z, shift if k in _SCALED else None)
        for k, lin in lins.items()
        if k in ESTIMATES
    }
    diag = token_diagnostics(tok) | {
        "terms_khat": terms_khat(lins["delta"].psi),
        "terms_khat_tok": terms_khat(lins["delta_tok"].psi),
    }
    messages = token_warnings(diag, tok)
    broken = broken_bounds(ests, support_size, tok.mask.shape[1])
    if broken:
        messages.append(bounds_warning(method, broken, diag))
    q_fields = {}  # with q only: without it the result is exactly today's
    if tok.log_rho0 is not None:
        q_fields["proposal"] = token_proposal(tok.p0_view())
        messages += proposal_warnings(q_fields["proposal"])
    for message in messages:
        warnings.warn(message, EstimatorWarning, stacklevel=2)
    return TokenDelta(
        **ests,
        method=method,
        beta=BETA[method],
        prompts=prompts,
        mean_length0=lins["length0"].value,
        mean_length1=_times(lins["length1"].value, shift),
        **diag,
        warnings=tuple(messages),
        **q_fields,
        max_length=int(tok.mask.shape[1]),
        out_of_bounds=tuple(str(c) for c in broken),
        fingerprint=tok.fingerprint,
    )


def terms_khat(psi: np.ndarray) -> float | None:
    """Pareto k̂ of the per-row influence terms |ψ_i| (one tail fit over all rows, ψ centred within
    prompts): the tail of what the estimate averages. Above 1/2 the terms' variance is infinite
    and the normal interval has no footing; above 0.7 the tail is too heavy for the sample to hold
    (Vehtari et al. 2024, §3). None when there are fewer than ``MIN_TAIL_FIT`` nonzero terms (no
    fit: ψ ≡ 0 when p1 = p0); inf when a term is not finite."""
    if not np.isfinite(psi).all():
        return math.inf
    a = np.abs(psi)
    a = a[a > 0]
    if a.size < MIN_TAIL_FIT or not np.ptp(np.log(a)) > 0:
        return None
    return float(psis(np.log(a)[None, :])[1][0])


# The p1 terms weigh by ρ = e^{log ρ}. When a prefix log-ratio passes LOG_MAX they are computed
# as e^{log ρ − shift}, the shift bringing the largest ratio that carries weight (at a counted
# position, or in a control term with û > 0) down to e^{LOG_MAX}, exponents capped at _EXP_CAP
# where nothing is weighed (so no inf·0), and scaled back at the end: every sum, square and
# difference stays finite, a heavy-tailed sample gives ±inf for the per-sequence pd / cv figures
# (their values are past float64), never NaN, and the per-token ratios, where the shift cancels,
# stay finite. 300 leaves room for squares in the SE (e^600); ordinary ratios never come near it,
# and below it the plain formulas run unchanged (bit-identical results).
_EXP_CAP = 700.0
_SCALED = ("h1", "delta", "path_shift", "length1")  # linear in ρ: computed scaled by e^{−shift}


def _log_shift(tok: PrefixRows, method: str) -> float | None:
    """None when no prefix log-ratio log ρ_t or log ρ_t + δ_t passes LOG_MAX (the plain
    formulas); else the shift of the log-space formulas (see above)."""
    if method == "pd_sn" or max(tok.log_rho.max(), (tok.log_rho + tok.delta).max()) <= LOG_MAX:
        return None
    counted = tok.mask > 0
    top = tok.log_rho[counted].max(initial=0.0)
    if method == "cv":  # ρ_{t+1} enters the control where û > 0: some other row still counts a later token
        later = np.cumsum(tok.mask[:, ::-1], axis=1)[:, ::-1] - tok.mask  # Σ_{s>t} m_is, [N, C]
        weighed = counted & (_leave_one_out(tok.groups, later) > 0)
        top = max(top, (tok.log_rho + tok.delta)[weighed].max(initial=0.0))
    return max(0.0, float(top) - LOG_MAX)


def _exp(x: np.ndarray) -> np.ndarray:
    """e^x with the exponent capped at _EXP_CAP (only where the result is weighed by 0)."""
    return np.exp(np.minimum(x, _EXP_CAP))


def _times(x: float, shift: float | None) -> float:
    """x · e^shift without 0 · inf (an overflow gives ±inf, never NaN)."""
    if not shift or x == 0:
        return float(x)
    with np.errstate(over="ignore"):
        return float(np.exp(np.log(abs(x)) + shift)) * (1.0 if x > 0 else -1.0)


def _estimate(lin: Linear, se: float, level: float, z: float, shift: float | None) -> Estimate:
    """The Estimate of a linearisation computed scaled by e^{−shift} (None: ``Estimate.normal``).
    An infinite value or an undefined SE (a ratio whose denominator cancelled) is reported with
    an infinite SE and interval, never NaN."""
    v = lin.value
    if not shift:
        est = Estimate.normal(v, se, level, z)
    else:
        est = Estimate(_times(v, shift), _times(se, shift), _times(v - z * se, shift), _times(v + z * se, shift), level)
    if math.isnan(est.value) or all(map(math.isfinite, (est.value, est.se, est.ci_low, est.ci_high))):
        return est  # NaN only when the data hold none of a quantity (every row L = 0): left as is
    return Estimate(est.value, math.inf, -math.inf, math.inf, level)


def _scale(lin: Linear, factor: float) -> Linear:
    return Linear(lin.value * factor, lin.psi * factor, lin.z * factor)


def _check_method(method) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method: expected one of {list(METHODS)} (a string), got {type(method).__name__} {method!r}.")
    if method not in METHODS:
        raise ValueError(
            f"method: expected one of {list(METHODS)}, got {method!r}; 'cv' (the default) "
            "has the smallest variance, 'pd' is the plain per-decision estimator."
        )


def _leave_one_out(groups: Groups, x: np.ndarray) -> np.ndarray:
    """Σ_{j∈p, j≠i} x_j for every row i, [N, C] -> [N, C]."""
    return expand(groups, groups.sum(x)) - x


def _control(tok: PrefixRows, a: np.ndarray, shift: float | None = None) -> np.ndarray:
    """Per-row control Σ_t m_it û_it ρ_it (e^{δ_it} − 1), [N]; mean 0 under p0 exactly.

    û_it = Σ_{j≠i} Σ_{s>t} a_js / Σ_{j≠i} m_jt: the remaining ``a`` of the prompt's other rows
    still generating at t. Built from other rows only, so it is independent of row i and the
    product keeps mean zero (no cross-fitting bias). ``shift``: ρ scaled by e^{−shift}.
    """
    remaining = np.cumsum(a[:, ::-1], axis=1)[:, ::-1] - a  # Σ_{s>t} a_is, [N, C]
    alive = _leave_one_out(tok.groups, tok.mask)  # [N, C]
    u = np.divide(_leave_one_out(tok.groups, remaining), alive, out=np.zeros_like(alive), where=alive > 0)
    if shift is not None:  # e^{δ} − 1 may overflow: the difference of two scaled exponentials
        increment = tok.mask * (_exp(tok.log_rho + tok.delta - shift) - _exp(tok.log_rho - shift))
    else:  # expm1: δ = 0 (p1 = p0, or a non-counted position) gives exactly 0
        increment = tok.mask * np.exp(tok.log_rho) * np.expm1(tok.delta)  # ρ_{t+1} − ρ_t, [N, C]
    return (u * increment).sum(axis=1)


def _p1_rows(tok: PrefixRows, a: np.ndarray, method: str, shift: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row values y_i (mean_i y_i estimates E_p1[Σ_t a_t] in each prompt) and their
    within-prompt influence terms φ_i, both [N]; for "pd" and "cv" scaled by e^{−shift}."""
    g = tok.groups
    if method == "pd_sn":
        w = sn_weights(tok)
        y = (w * a).sum(axis=1)
        ratio = g.sum(w * a) / g.sizes[:, None]  # R_pt = Σ_i ρ a / Σ_i ρ, [P, C]
        # linearised ratio of means per column, φ_i = Σ_t w_it (a_it − R_pt), written as
        # y_i − ȳ_p − Σ_t (w_it − 1) R_pt (ȳ_p = Σ_t R_pt) so that ρ ≡ 1 gives p0's φ exactly
        phi = y - g.expand(g.mean(y)) - ((w - 1.0) * expand(g, ratio)).sum(axis=1)
        return y, phi
    y = ((np.exp(tok.log_rho) if shift is None else _exp(tok.log_rho - shift)) * a).sum(axis=1)
    if method == "cv":
        y = y - _control(tok, a, shift)
    return y, y - g.expand(g.mean(y))


def _p0_rows(tok: PrefixRows, a: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """y_i = Σ_t a_it and φ_i = y_i − ȳ_p (uniform weights under p0), [N] each; with a proposal
    q, ``method``'s p1 formulas on the p0/q prefix ratios (no shift: p0/q ratios near e^300
    mean the sampler is not p0 at all, and the proposal ESS says so)."""
    if tok.log_rho0 is not None:
        return _p1_rows(tok.p0_view(), a, method)
    g = tok.groups
    # Σ_t 1.0 · a: the same float ops as the p1 terms with ρ ≡ 1, so p1 = p0 gives 0 exactly
    y = (np.ones_like(a) * a).sum(axis=1)
    return y, y - g.expand(g.mean(y))


def _linear(g: Groups, num: tuple, den: tuple | None = None) -> Linear:
    """Σ_p ȳ_p / Σ_p d̄_p (den None: (1/P) Σ_p ȳ_p) with ψ, z as in uncertainty.py.

    ``num`` = (y, φ) per row; ȳ_p = mean_{i∈p} y_i. Ratio: ψ = (φ_y − R φ_d)/B,
    z_p = (ȳ_p − R d̄_p)/B, B = mean_p d̄_p (the uniform-weight case of ``weighted_ratio``).
    """
    y_bar = g.mean(num[0])  # [P]
    if den is None:
        value = float(y_bar.mean())
        return Linear(value, num[1], y_bar - value)
    d_bar = g.mean(den[0])  # [P]
    b = d_bar.mean()
    value = float(y_bar.mean() / b)
    return Linear(value, (num[1] - value * den[1]) / b, (y_bar - value * d_bar) / b)


def _estimates(tok: PrefixRows, method: str) -> tuple[dict[str, Linear], float | None]:
    """Linearised h0 … path_shift and the two mean lengths; and the shift: the ``_SCALED`` ones
    are e^{−shift} times their value (None: the plain formulas, always for pd_sn, whose weights
    are self-normalised)."""
    g = tok.groups
    shift = _log_shift(tok, method)
    h1_rows, h0_rows = _p1_rows(tok, tok.a1, method, shift), _p0_rows(tok, tok.a0, method)
    len1, len0 = _p1_rows(tok, tok.mask, method, shift), _p0_rows(tok, tok.mask, method)
    out = {"h0": _linear(g, h0_rows), "h1": _linear(g, h1_rows)}
    # every row L = 0: nan rates; cv's length estimate near 0 after a huge step: ±inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out["h0_tok"] = _linear(g, h0_rows, len0)
        out["h1_tok"] = _linear(g, h1_rows, len1)  # a ratio: the shift cancels
    h0 = _scale(out["h0"], np.exp(-shift)) if shift else out["h0"]  # in h1's scale (a no-op at 0)
    out["delta"] = out["h1"] - h0
    out["delta_tok"] = out["h1_tok"] - out["h0_tok"]
    out["direct"] = _linear(g, _p0_rows(tok, tok.a1, method)) - out["h0"]
    out["path_shift"] = out["delta"] - (_scale(out["direct"], np.exp(-shift)) if shift else out["direct"])
    out["length0"], out["length1"] = _linear(g, len0), _linear(g, len1)
    return out, shift
