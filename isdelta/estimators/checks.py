"""The headline policy's checks (DESIGN.md §5.4): the :class:`Check` record, the physical bounds
of entropy, and each method's preconditions with their thresholds. :mod:`isdelta.estimators.policy`
combines them into the step's verdicts; its docstring says why each threshold is what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from isdelta.estimators.proposal import PROPOSAL_ESS
from isdelta.estimators.psis import MIN_TAIL_FIT
from isdelta.estimators.results import EntropyDelta, TokenDelta

__all__ = [
    "LENGTH_SHIFT",
    "SUPPORT_MAX",
    "TAIL_UNCHECKED_TOKENS",
    "TERMS_KHAT",
    "TERMS_KHAT_TOK",
    "Check",
    "bounds",
    "coverage_checks",
    "per_decision_checks",
    "sequence_checks",
    "snis_checks",
    "token_bounds",
    "token_checks",
]

# Chosen on the ground-truth grid (8 real SmolLM2 steps × G = 8, 16, 64; 832 sample sets): with
# these, 87% of sets are valid and every method chosen covers the truth in ≥ 90% of the sets of
# every (step, G) where it was chosen (cv 98% of 509, pd 96% of 210 overall). Looser ones let
# pd_sn and SNIS in on heavy steps, where they covered 0–75%.
CV_PREFIX_ESS = 0.9  # cv: smallest prefix ESS / G
PD_PREFIX_ESS = 0.3  # pd: smallest prefix ESS / G
SN_PREFIX_ESS = 0.3  # pd_sn: smallest prefix ESS / G (a fallback for pd out of bounds)
RATIO_BAND = 2.0  # every method: mean full-sequence ratio per prompt within [1/2, 2]
SNIS_ESS = 0.5  # SNIS: pooled ESS / S
# the per-row terms' tail (issue 26): Pareto k̂ of the terms of ΔH per sequence / per token
TERMS_KHAT = 0.7
TERMS_KHAT_TOK = 0.7
LENGTH_SHIFT = 0.05  # the sequence level: |E_p1[L] / E_p0[L] − 1| ≤ max(5%, 1 token / E_p0[L])
LENGTH_SHIFT_TOKENS = 1.0
# the sequence level on long completions needs its tail checked: with fewer than MIN_TAIL_FIT (25)
# nonzero per-row terms k̂ cannot be fitted, and completions averaging more than this many tokens
# under p0 then refuse ΔH per sequence (at 512 tokens, G = 8 × 2 prompts, such sets covered 4 of 6)
TAIL_UNCHECKED_TOKENS = 64.0
PER_SEQUENCE = "per sequence"  # the bounds whose name says so gate the sequence level only
SEQUENCE_ONLY = (
    "the per-token headline (delta_tok) is reported, ΔH per sequence is not. ΔH per sequence sums a "
    "change over every position of a completion, and its per-row terms are dominated by the few "
    "completions whose length or path p1 favours: a tail too heavy for this sample to hold, so its "
    "interval has no footing. The per-token rate is a ratio of two such sums over the same weights; "
    "its terms have a light tail."
)
# the support of a next-token distribution when the caller does not give one: token ids are 32-bit
# integers (tokenizers, SentencePiece, tiktoken), so no vocabulary is larger; ln 2^32 = 22.2 nats
SUPPORT_MAX = 2**32


@dataclass(frozen=True)
class Check:
    """One precondition: ``name`` (what is measured), ``value``, the rule (``op`` ``threshold``)."""

    name: str
    value: float
    op: str  # "≥" or "≤"
    threshold: float

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.op == "≥" else self.value <= self.threshold

    def __str__(self) -> str:
        return f"{self.name} {self.value:.3g} {'✓' if self.passed else '✗'} (needs {self.op} {self.threshold:.3g})"

    def to_dict(self) -> dict:
        v = self.value if math.isfinite(self.value) else None
        return {
            "name": self.name,
            "value": v,
            "op": self.op,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "passed": self.passed,
        }


def bounds(est, support_size: int | None = None, max_length: int | None = None) -> list[Check]:
    """The physical bounds of entropy on a result's point estimates, as checks (DESIGN.md §5.4).

    H ≥ 0 per sequence and per token under p0 and p1; ΔH ≥ −H(p0) (both scales); a per-token
    entropy ≤ ln V (V = ``support_size``, ``SUPPORT_MAX`` when None); with ``max_length`` = C (a
    per-decision result: sums over C columns) a per-sequence one ≤ C·ln V; ΔH and its SE finite.
    ``est`` has ``h0``, ``h1``, ``delta`` and their ``_tok`` rates as Estimates.
    """
    log_v = math.log(SUPPORT_MAX if support_size is None else support_size)
    v_name = "log|support|" if support_size is not None else "log 2^32 (no support_size given)"
    h0, h1, h0_tok, h1_tok = (getattr(est, k).value for k in ("h0", "h1", "h0_tok", "h1_tok"))
    checks = [
        Check("H(p1) per sequence", h1, "≥", 0.0),
        Check("H(p1) per token", h1_tok, "≥", 0.0),
        Check("H(p0) per sequence", h0, "≥", 0.0),
        Check("H(p0) per token", h0_tok, "≥", 0.0),
        Check("ΔH per sequence vs −H(p0)", est.delta.value, "≥", -h0),
        Check("ΔH per token vs −H(p0) per token", est.delta_tok.value, "≥", -h0_tok),
        Check(f"H(p1) per token vs {v_name}", h1_tok, "≤", log_v),
        Check(f"H(p0) per token vs {v_name}", h0_tok, "≤", log_v),
    ]
    if max_length is not None:
        top, name = max_length * log_v, f"{max_length} positions · {v_name}"
        checks += [
            Check(f"H(p1) per sequence vs {name}", h1, "≤", top),
            Check(f"H(p0) per sequence vs {name}", h0, "≤", top),
        ]
    finite = all(math.isfinite(e.value) and math.isfinite(e.se) for e in (est.delta, est.delta_tok))
    return checks + [Check("ΔH and its SE finite", 1.0 if finite else math.nan, "≥", 1.0)]


def _farthest_from_one(lo: float, hi: float) -> float:
    """min(lo, 1/hi): how far a range of mean ratios strays from 1, both ways; nan if either is
    (``min`` would drop a nan, and the check pass)."""
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    return min(lo, 1.0 / hi) if hi > 0 else 0.0


def coverage_checks(snis: EntropyDelta) -> list[Check]:
    """What every method needs: p0's samples reach where p1 puts its mass. Under p0 the mean
    full-sequence ratio r = p1/p0 is 1 in every prompt; a sample mean far from 1 (often 10⁻¹⁰
    after a large step) means p1's mass lies where no sample went, and a self-normalised
    estimate, bounded as it is, would still report a confident wrong number."""
    lo = _farthest_from_one(snis.mean_ratio_min, snis.mean_ratio_max)  # distance from 1, both ways
    q = snis.proposal
    ratio = "p1/p0" if q is None else "p1/q"  # the H1 weights' ratio: 1 on average under the sampler
    checks = [Check(f"mean ratio {ratio} per prompt (farthest from 1, as min(r, 1/r))", lo, "≥", 1.0 / RATIO_BAND)]
    if q is not None:  # H0 weighted by p0/q too: the same two questions of those weights
        lo_q = _farthest_from_one(q.mean_ratio_min, q.mean_ratio_max)
        checks += [
            Check("ESS / S of p0/q (pooled)", q.ess_frac, "≥", PROPOSAL_ESS),
            Check("mean ratio p0/q per prompt (farthest from 1, as min(r, 1/r))", lo_q, "≥", 1.0 / RATIO_BAND),
        ]
    return checks


PREFIX_ESS = {"cv": CV_PREFIX_ESS, "pd": PD_PREFIX_ESS, "pd_sn": SN_PREFIX_ESS}


def per_decision_checks(tok: TokenDelta) -> list[Check]:
    checks = [Check("prefix ESS / G (smallest)", tok.prefix_ess_frac_min, "≥", PREFIX_ESS[tok.method])]
    if tok.proposal is not None:  # H0's prefix ratios p0/q rest on the same kind of sample
        frac = tok.proposal.prefix_ess_frac_min
        checks.append(Check("prefix ESS / G of p0/q (smallest)", frac, "≥", PREFIX_ESS[tok.method]))
    return checks


def _terms_check(est, first: TokenDelta | None, tok: bool) -> list[Check]:
    """Pareto k̂ of the per-row terms of ΔH at one level, the method's own (SNIS, whose terms its
    result does not keep, is held to the first per-decision method's); none without a
    per-decision result or with too few rows for a tail fit (``TokenDelta.terms_khat`` None)."""
    if first is None:
        return []
    own = est if isinstance(est, TokenDelta) else first
    k = own.terms_khat_tok if tok else own.terms_khat
    unit = "per token" if tok else PER_SEQUENCE
    name = f"Pareto k̂ of {own.method}'s per-row terms of ΔH {unit} (their tail: the interval's footing)"
    if k is None:
        if tok or not (math.isfinite(TERMS_KHAT) and own.mean_length0 > TAIL_UNCHECKED_TOKENS):
            return []
        # too few rows for the fit, on completions long enough for the tail to matter: refused
        name += f", not estimable (< {MIN_TAIL_FIT} nonzero terms) at {own.mean_length0:.0f} tokens > {TAIL_UNCHECKED_TOKENS:g}"
        return [Check(name, math.nan, "≤", TERMS_KHAT)]
    return [Check(name, k, "≤", TERMS_KHAT_TOK if tok else TERMS_KHAT)]


def sequence_checks(est, first: TokenDelta | None, lengths: TokenDelta | None = None) -> list[Check]:
    """The sequence level's own checks on this sample: the tail of ΔH's per-row terms per sequence
    (the method's), and how far the step moves the mean completion length, a property of the
    sample, the same for every method: ``lengths``' estimate of E_p1[L] (``pd_sn``'s when given:
    a self-normalised weighted mean of the observed lengths, bounded by them; else ``first``'s)
    against E_p0[L]. A per-sequence ΔH then rests on the tail of the length distribution, which
    p0's samples reach least. None without a per-decision result."""
    if first is None:
        return []
    ref = lengths or first
    shift = abs(ref.mean_length1 / ref.mean_length0 - 1.0) if ref.mean_length0 > 0 else math.nan
    name = f"length shift {PER_SEQUENCE}, |E_p1[L] / E_p0[L] − 1| ({ref.method}: {ref.mean_length1:.4g} / {ref.mean_length0:.4g} tokens)"
    # a shift below one token is no length effect, whatever its ratio (3.3 vs 3.5 tokens is 5%)
    limit = max(LENGTH_SHIFT, LENGTH_SHIFT_TOKENS / ref.mean_length0) if ref.mean_length0 > 0 else LENGTH_SHIFT
    return _terms_check(est, first, tok=False) + [Check(name, shift, "≤", limit)]


def token_checks(est, first: TokenDelta | None) -> list[Check]:
    """The per-token level's check (both levels need it): the tail of ΔH's per-row terms per token."""
    return _terms_check(est, first, tok=True)


def _samples_over_exp_kl(g: int, kl: float) -> float:
    """G / exp(KL) in log space: exp(KL) over- or underflows after a large step (KL = −10⁴ gave
    G / 0); nan stays nan, so the check fails. A KL below −log 2 cannot pass the policy anyway:
    Σ w̄ ℓ = log mean r + KL(w̄ ‖ uniform) ≥ log mean r, so that prompt's mean ratio is below 1/2."""
    return math.exp(min(math.log(max(g, 1)) - kl, 700.0))


def snis_checks(snis: EntropyDelta) -> list[Check]:
    return [
        Check("ESS / S (pooled)", snis.ess_frac, "≥", SNIS_ESS),
        Check(
            "samples per prompt / exp(KL) (smallest prompt vs largest KL)",
            _samples_over_exp_kl(snis.g_min, snis.kl_max),
            "≥",
            1.0,
        ),
    ]


def token_bounds(tok: TokenDelta, support_size: int | None) -> list[Check]:
    """``bounds`` of a per-decision result, and any that ``estimate_tokens`` found broken under
    its own ``support_size`` (one the headline was not given)."""
    checks = bounds(tok, support_size, tok.max_length)
    if tok.out_of_bounds:
        n = len(tok.out_of_bounds)
        checks.append(Check(f"bounds estimate_tokens found broken ({'; '.join(tok.out_of_bounds)})", n, "≤", 0))
    return checks
