"""Sequence-level SNIS: ``estimate`` (H(p0), H(p1), ΔH with uncertainty, ΔH₁, diagnostics) and
``estimate_per_prompt`` (the same within each prompt)."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from isdelta.estimators import diagnostics, inputs
from isdelta.estimators.inputs import Rows
from isdelta.estimators.moments import first_order, ratio_estimates, row_sums
from isdelta.estimators.proposal import ProposalWeights
from isdelta.estimators.results import EntropyDelta, Estimate, EstimatorWarning
from isdelta.estimators.uncertainty import (
    Linear,
    covariance,
    standard_error,
    weighted_covariance,
    weighted_ratio,
    z_value,
)
from isdelta.estimators.weights import Scheme, Weights, weigh

__all__ = ["estimate", "estimate_per_prompt"]


def estimate(
    log_p0,
    log_p1,
    length,
    group=None,
    *,
    entropy_sum0=None,
    entropy_sum1=None,
    weights: Scheme = "psis",
    include: Literal["all", "no_eos"] = "all",
    prompts: Literal["fixed", "sampled"] = "fixed",
    level: float = 0.95,
    clip: float | None = None,
    stopped=None,
    eos_logp0=None,
    eos_logp1=None,
    eos_entropy_sum0=None,
    eos_entropy_sum1=None,
    log_q=None,
) -> EntropyDelta:
    r"""Estimate H(p0), H(p1) and ΔH = H(p1) − H(p0) from samples of p0 (or of a proposal q) by SNIS.

    Rows x_i ~ p0 are scored under both models: S0_i = log p0(x_i), S1_i = log p1(x_i),
    ℓ_i = S1_i − S0_i. Within prompt p, w̄_i = exp(ℓ_i) / Σ_{j∈p} exp(ℓ_j); each prompt has
    mass 1/P:

    - H0 = −(1/P) Σ_p mean_{i∈p} S0_i,   H1 = −(1/P) Σ_p Σ_{i∈p} w̄_i S1_i,   ΔH = H1 − H0
    - H0_tok = Σ_p mean_{i∈p}(−S0_i) / Σ_p mean_{i∈p} L_i,
      H1_tok = Σ_p Σ w̄_i(−S1_i) / Σ_p Σ w̄_i L_i (entropy rates: ratios of means)
    - ``*_rb``: −S_k replaced by ``entropy_sum{k}`` (chain rule: same expectation, lower
      variance)
    - ΔH₁ = −(1/P) Σ_p Cov_p(S0, δ), δ = S1 − S0; ΔĤ = cov_term + kl_term exactly, with
      cov_term = −(1/P) Σ_p mean_{i∈p}((r̃_i − 1)(S0_i − S̄0_p)), r̃ = G_p w̄, and
      kl_term = −(1/P) Σ_p Σ_{i∈p} w̄_i δ_i, for whichever normalised weights are used.

    With ``log_q`` (rows drawn from a proposal q ≠ p0, e.g. vLLM; Sq_i = log q(x_i)), both
    entropies are self-normalised IS estimates within each prompt:
    v̄_i = e^{S0_i − Sq_i} / Σ_{j∈p} e^{S0_j − Sq_j},  w̄_i = e^{S1_i − Sq_i} / Σ_{j∈p} e^{S1_j − Sq_j},

    - H0 = −(1/P) Σ_p Σ_{i∈p} v̄_i S0_i,   H1 = −(1/P) Σ_p Σ_{i∈p} w̄_i S1_i (rates, ``*_rb``
      and the no-EOS terms alike: every expectation under p0 takes v̄ in place of 1/G_p)
    - ΔH₁ = −(1/P) Σ_p Cov_p0(S0, δ), the covariance weighted by v̄ (divided by 1 − Σ v̄²,
      which is ddof = 1 at v̄ = 1/G_p); cov_term uses (w̄ − v̄) in place of (w̄ − 1/G_p).

    Self-normalised (rather than (1/G_p) Σ (p0/q) S0) because it is invariant to a constant
    offset in log q (a sampler's logits need not be normalised the same way), bounded by the
    data, and reduces to today's 1/G_p exactly when Sq = S0; its O(1/G) bias is negligible
    when q ≈ p0, which ``.proposal`` (ESS, k̂, mean ratio of p0/q) checks. The weighting
    scheme (PSIS, truncation, clip) acts on p0/q and on p1/q alike.

    Parameters
    ----------
    log_p0, log_p1 : array_like, float, shape [N] or [P, G]
        Total log-probability of each sampled completion under p0 (the sampler) and p1, in
        nats, over the counted tokens (EOS included). 2-D: row p holds prompt p's G samples.
    length : array_like, shape like ``log_p0``
        Counted tokens L_i ≥ 0 per row (EOS included).
    group : array_like, shape [N], optional
        Prompt id of each row for 1-D inputs (any sortable ids; ragged G allowed, G_p ≥ 2).
        None with 1-D inputs: all rows belong to one prompt. Must be None for 2-D inputs.
    entropy_sum0, entropy_sum1 : array_like, shape like ``log_p0``, optional
        Σ_t H(next token | prefix) along each row under p0 and p1 (both or neither); enables
        the Rao–Blackwellised ``*_rb`` estimates.
    weights : {"psis", "none", "truncate", "clip"}
        Weight scheme; see :mod:`isdelta.estimators.weights`. PSIS and truncation act per
        prompt when every G_p ≥ 25, else pooled over all rows (``weights_used`` says which).
    include : {"all", "no_eos"}
        "no_eos" subtracts the stop token's position from S0, S1 and L of rows with
        ``stopped``; the weights still use the full-sequence ratio, because p0 (or q) sampled
        the stop token too. Needs ``stopped``, ``eos_logp0``, ``eos_logp1`` and, with entropy
        sums, ``eos_entropy_sum0``, ``eos_entropy_sum1``.
    prompts : {"fixed", "sampled"}
        "fixed": the estimand is this prompt set; SE = √(Σ_p var_p(ψ)/G_p)/P.
        "sampled": prompts are a sample from a population; SE = sd_p(ΔH_p)/√P (P ≥ 2).
    level : float in (0, 1)
        Coverage of the normal confidence intervals value ± z·SE.
    clip : float, optional
        The cap c in r ≤ c; required for, and only used with, ``weights="clip"``.
    stopped : array_like of bool, shape like ``log_p0``, optional
        Whether each row ends with a stop token (gives ``no_stop_frac``).
    eos_logp0, eos_logp1 : array_like, shape like ``log_p0``, optional
        For "no_eos": log-prob of the final stop token of each row under p0 / p1 (read only
        where ``stopped`` is True; put anything, even nan, elsewhere).
    eos_entropy_sum0, eos_entropy_sum1 : array_like, shape like ``log_p0``, optional
        For "no_eos" with entropy sums: Σ_t −Σ_{e∈stop ids} p(e | prefix_t) log p(e | prefix_t)
        over *every* counted position of the row, the stop tokens' share of ``entropy_sum``.
        Not just the last position: excluding the stop token is a choice made after seeing
        x_t, so the Rao–Blackwellised term at each position t is the entropy of the non-stop
        tokens, H_t − (−p_stop log p_stop), whose sum along the row has expectation
        E[−S + log p(stop)] (tower property).
    log_q : array_like, shape like ``log_p0``, optional
        Total log-probability of each row under the sampler q that drew it (its processed
        log-probs, summed over the same tokens as ``log_p0``). None (default): the rows come
        from p0 and every result is exactly what it is without this argument.

    Returns
    -------
    EntropyDelta
        Estimates (nats; ``.bits`` converts) with SE and CI, ΔH₁ and its decomposition,
        diagnostics, the tuple of warnings issued, and the weights used (``.weights``, rows in
        the caller's order and shape). With ``log_q``: ``weights``, ESS, k̂, KL and mean ratio
        describe the H1 weights p1/q, and ``.proposal`` the H0 weights p0/q. ``.fingerprint``
        identifies the rows (``headline`` refuses results of different rows).

    Raises
    ------
    ValueError
        Mismatched shapes, non-finite or positive log-probs, lengths that are negative or not
        whole numbers, a row with L = 0 whose log-probs are not 0, ``group`` ids that are floats
        with a fraction (log-probs in its place), a prompt with one row, an unknown option,
        ``level`` outside (0, 1), missing "no_eos" inputs, or a ``log_q`` of another shape,
        non-finite (q drew every row, so log q > −inf) or positive. Where arrays look swapped,
        the message gives the order of the arguments.
    TypeError
        None for a required array; an option of the wrong type (``weights``, ``include``,
        ``prompts`` not strings, ``level`` or ``clip`` not numbers).

    Warns
    -----
    EstimatorWarning
        k̂ above its threshold (or not estimable), ESS/S < 0.1, S < exp(KL), a prompt's mean
        ratio outside [0.5, 2], rows with L = 0; with ``log_q``, also ESS/S of p0/q below
        0.5 or its mean ratio outside [0.5, 2]. Each is also recorded in ``.warnings``.

    Notes
    -----
    The SE of ΔH uses the paired influence function
    ψ_i = r̃_i(−S1_i − H1_p) − (−S0_i − H0_p), so the covariance between H1 and H0 (same
    samples) is counted; per-token estimates use their linearised (delta-method) terms
    (:mod:`isdelta.estimators.uncertainty`). All arithmetic is float64, weights in log space.
    With q, each SNIS mean Σ v̄ f linearises to ψ_i = ṽ_i (f_i − Σ_{j∈p} v̄_j f_j), ṽ = G_p v̄
    (the ratio of two sample means, Σ (p0/q) f / Σ (p0/q)), so ΔH's paired term becomes
    ψ_i = r̃_i(−S1_i − H1_p) − ṽ_i(−S0_i − H0_p): both weights and their covariance counted.

    References
    ----------
    Owen, A. B. (2013). Monte Carlo theory, methods and examples, ch. 9 (SNIS and its
    delta-method variance). https://artowen.su.domains/mc/
    Vehtari, A. et al. (2024). Pareto smoothed importance sampling. JMLR 25(72):1-58.
    """
    inputs.check_options(weights=weights, include=include, prompts=prompts, level=level, clip=clip)
    eos = {
        "eos_logp0": eos_logp0,
        "eos_logp1": eos_logp1,
        "eos_entropy_sum0": eos_entropy_sum0,
        "eos_entropy_sum1": eos_entropy_sum1,
    }
    rows = inputs.prepare(
        log_p0, log_p1, length, group, entropy_sum0=entropy_sum0, entropy_sum1=entropy_sum1,
        include=include, stopped=stopped, eos=eos, log_q=log_q,
    )  # fmt: skip
    if prompts == "sampled" and rows.groups.n_prompts < 2:
        raise ValueError(
            "prompts: 'sampled' needs at least 2 prompts for a between-prompt SE, got 1; use "
            "prompts='fixed' or pass `group`."
        )
    if rows.log_r1q is None:  # x ~ p0: uniform H0 weights
        wts, p0_wts, u = weigh(rows.log_r, rows.groups, weights, clip), None, None  # u: 1/G_p
    else:  # x ~ q: H1 weighted by p1/q, H0 by p0/q, the same scheme for both
        wts = weigh(rows.log_r1q, rows.groups, weights, clip)
        p0_wts = weigh(rows.log_r0q, rows.groups, weights, clip)
        u = p0_wts.w
    # every per-prompt sum in one pass over the rows (ΔH₁'s too when its terms lie within prompts)
    sums = row_sums(rows, wts.w, u, covariance=rows.log_r0q is None and rows.delta is None)
    fields = ratio_estimates(rows, wts.w, u, prompts, level, z_value(level), sums)
    first, kl = _first_order(rows, wts, u, prompts, level, sums)
    fields.update(first)
    per_prompt = diagnostics.PerPrompt.of(rows, wts, kl)
    diag = diagnostics.diagnose(rows, wts, per_prompt, u, sums)
    messages = diagnostics.collect_warnings(rows, wts, diag, per_prompt)
    q_fields = {}  # with q only: without it the result is exactly today's
    if p0_wts is not None:
        q_fields["proposal"] = ProposalWeights.of(p0_wts, rows.log_r0q, rows.groups)
        messages += diagnostics.proposal_warnings(q_fields["proposal"])
    for message in messages:
        warnings.warn(message, EstimatorWarning, stacklevel=2)
    return EntropyDelta(
        **fields,
        **diag,
        weights_used=wts.description,
        prompts=prompts,
        include=include,
        warnings=tuple(messages),
        weights=wts.in_caller_order(rows.groups, np.shape(log_p0)),
        **q_fields,
        fingerprint=rows.fingerprint,
    )


def _to_estimate(lin: Linear, rows: Rows, prompts: str, level: float, sign: float = 1.0) -> Estimate:
    """The Estimate of ``sign`` × ``lin`` (the SE does not depend on the sign)."""
    se = standard_error(lin, rows.groups, prompts)
    return Estimate.normal(sign * lin.value, se, level, z_value(level))


def _first_order(
    rows: Rows, wts: Weights, u: np.ndarray | None, prompts: str, level: float, sums: dict
) -> tuple[dict, np.ndarray]:
    """ΔH₁ (function space), the exact decomposition ΔĤ = cov_term + kl_term, and KL_p = Σ_{i∈p} w̄_i ℓ_i.

    δ' = S1' − S0' uses the counted log-probs; ℓ the full-sequence ratio. With
    include="all" they coincide and ΔH₁ = −Cov_p0(S0, δ) (DESIGN §6). With "no_eos" the
    functional E_p[−S'] also changes through the stop token's own log-prob, whose first-order
    change is E_p0[ℓ − δ']: ΔH₁ = −Cov_p0(S0', ℓ) − E_p0[δ' − ℓ]. With a proposal q, ``u`` = v̄
    (p0/q) weighs every expectation under p0, and ΔĤ = −Σ(w̄ − v̄)(S0 − S̄0) − Σ w̄ δ still
    holds exactly (Σ_{i∈p}(w̄_i − v̄_i) = 0, so any centring S̄0 does). ``sums``: ``row_sums``'s,
    with the covariance's when the rows come from p0 and δ' = ℓ (the usual case).
    """
    g = rows.groups
    if "cov" in sums:  # the usual case: every term from the one pass over the rows
        return first_order(sums, g, prompts, level, z_value(level)), sums["kl"]
    u = g.uniform if u is None else u
    kl = g.sum(wts.w * rows.log_r)
    s0_bar = g.mean(rows.s0) if rows.log_r0q is None else g.sum(u * rows.s0)
    s0_centred = g.shaped(rows.s0) - g.per_row(s0_bar)
    # −mean_p((r̃ − 1)(S0 − S̄0)) = −Σ_{i∈p} (w̄_i − 1/G_p)(S0_i − S̄0_p)
    dw = g.shaped(wts.w - u)
    dw *= s0_centred
    cov_term = -g.sum(dw.reshape(-1)).mean()
    kl_term = -kl.mean() if rows.delta is None else -g.sum(wts.w * rows.delta).mean()  # δ' = ℓ, or not
    if rows.log_r0q is None:
        lin = covariance(rows.s0, rows.log_r, g, x_centred=s0_centred.reshape(-1))
    else:
        lin = weighted_covariance(rows.s0, rows.log_r, u, g)
    sign = -1.0  # ΔH₁ = −Cov
    if rows.delta is not None:  # δ' ≠ ℓ: −Cov − E_p0[δ' − ℓ]
        lin = Linear(-lin.value, -lin.psi, -lin.z) - weighted_ratio(u, rows.delta - rows.log_r, None, g)
        sign = 1.0
    fields = {"delta1": _to_estimate(lin, rows, prompts, level, sign), "cov_term": float(cov_term),
              "kl_term": float(kl_term)}  # fmt: skip
    return fields, kl


_ROW_OPTIONS = (
    "entropy_sum0",
    "entropy_sum1",
    "stopped",
    "eos_logp0",
    "eos_logp1",
    "eos_entropy_sum0",
    "eos_entropy_sum1",
    "log_q",
)  # per-row keyword arrays of ``estimate``


def estimate_per_prompt(log_p0, log_p1, length, group, **options) -> dict:
    """``estimate`` on each prompt's rows alone: ΔH_p, ΔH_p per token and their within-prompt SEs.

    One rule for every per-prompt table and plot: the pooled estimate's options (``weights``,
    ``clip``, ``include``, ``level`` and the per-row keyword arrays, which are sliced here), with
    ``prompts="fixed"`` (one prompt has no between-prompt SE). A prompt is weighted as ``estimate``
    would weight a one-prompt sample: PSIS smooths only with ≥ 25 rows (``MIN_TAIL_FIT``; with
    fewer the raw weights are used and ``weights_used`` says so), truncation caps at
    mean(r)·√G_p. Diagnostic warnings are recorded in each result's ``warnings``, not issued
    (they repeat the pooled estimate's).

    Parameters
    ----------
    log_p0, log_p1, length : array_like, shape [N]
    group : array_like, shape [N]
        Prompt id of each row; prompts with a single row are left out.
    **options
        Keyword arguments of :func:`estimate`.

    Returns
    -------
    dict of prompt id -> EntropyDelta, in sorted id order.

    Raises
    ------
    TypeError
        An option that ``estimate`` does not take, or None for a row array.
    ValueError
        Row arrays that are not 1-D [N] alike (``group`` and the per-row options included), or
        ``group`` holding no prompt ids (None, or floats with a fractional part); then whatever
        ``estimate`` refuses on a prompt's rows.

    Naive equivalent: ``{p: estimate(x[group == p] for each row array, **options) for p in
    np.unique(group)}``.
    """
    _check_per_prompt(log_p0, log_p1, length, group, options)
    group = np.asarray(group)
    arrays = {k: np.asarray(v) for k, v in options.items() if k in _ROW_OPTIONS and v is not None}
    scalars = {k: v for k, v in options.items() if k not in _ROW_OPTIONS}
    out = {}
    for p in np.unique(group):
        idx = np.flatnonzero(group == p)
        if len(idx) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)
            out[p.item()] = estimate(
                np.asarray(log_p0)[idx], np.asarray(log_p1)[idx], np.asarray(length)[idx],
                **{k: v[idx] for k, v in arrays.items()}, **{**scalars, "prompts": "fixed"},
            )  # fmt: skip
    return out


_OPTIONS = ("weights", "include", "prompts", "level", "clip", *_ROW_OPTIONS)  # estimate's keywords


def _check_per_prompt(log_p0, log_p1, length, group, options: dict) -> None:
    """The arguments of ``estimate_per_prompt`` before any slicing: options that ``estimate``
    takes, and row arrays that are 1-D [N] alike (a slice of a misshapen array would fail, or
    worse pass, far from its cause)."""
    unknown = [k for k in options if k not in _OPTIONS]
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of estimate; expected one of {list(_OPTIONS)}.")
    if group is None:
        raise ValueError(
            "group: expected one prompt id per row [N] (estimate_per_prompt splits the rows by prompt), "
            "got None; for one prompt call estimate(...) itself."
        )
    s0 = inputs.as_rows("log_p0", log_p0)
    if np.ndim(log_p0) != 1:
        raise ValueError(
            f"log_p0: expected a 1-D array [N] with `group`, got shape {np.shape(log_p0)}; for [P, G] "
            "arrays pass x.reshape(-1) and group=np.repeat(np.arange(P), G)."
        )
    inputs.as_rows("log_p1", log_p1, s0.shape)
    inputs.as_rows("length", length, s0.shape)
    inputs.group_codes(group, s0.size)
    for k in _ROW_OPTIONS:
        if options.get(k) is not None and np.shape(options[k]) != s0.shape:
            raise ValueError(
                f"{k}: expected shape {s0.shape} like log_p0 (one entry per row), got {np.shape(options[k])}."
            )
