"""The headline policy (DESIGN.md §5.4): one number per step that is never impossible, and never
looks valid when it is not.

A user reads one ΔH per optimizer step. :func:`headline` picks it from the estimates computed on
that step's samples: the lowest-variance method whose preconditions hold on this sample, in the
order per-decision with a control variate (``cv``) → plain per-decision (``pd``) →
self-normalised per-decision (``pd_sn``) → sequence-level SNIS (Rao–Blackwellised when entropy
sums were scored). Every precondition is a named :class:`Check` (a diagnostic, its value and its
threshold), and every method must also respect the physical bounds of entropy:

- every entropy is ≥ 0 (so ΔH ≥ −H0), per sequence and per token;
- a per-token entropy is ≤ log |support| (the vocabulary, or top-k, when the caller knows it;
  else 2^32, the most ids a tokenizer can name: the tokenizers, SentencePiece and tiktoken
  libraries store token ids as 32-bit integers);
- a per-decision estimate per sequence is a sum over the C columns of its arrays, so it is
  ≤ C·log |support| (``TokenDelta.max_length`` = C).

Each bound is checked on the point estimates by :func:`bounds`, which ``estimate_tokens`` also
runs (it warns, and records the broken ones in ``TokenDelta.out_of_bounds``). A step of any size
ends in a headline, valid or not: the checks are computed in log space where an exponential
could under- or overflow, and a check whose value or threshold is nan fails.

The results passed in must describe the same rows: each carries a :class:`RowsFingerprint`
(N, the prompt layout, lengths and log p0 per row), and ``headline`` raises ``ValueError`` when
two differ; that is a mistake in the call, not a property of the sample.

A Pareto k̂ above 1 (the ratio p1/p0 has no finite mean) with ESS / S below ``KHAT_ESS_GATE``
rules out every method (with the ESS above it, a k̂ > 1 was a noisy fit: on the ground-truth
grid it came from steps at ESS/S ≈ 1 whose estimates covered the truth). When no method
qualifies the result is ``valid=False`` with the failed checks as the reason and what would make
the step readable (samples per prompt, or a smaller step) as the advice.

Preconditions and why (thresholds chosen on real SmolLM2 steps against direct Monte Carlo, so
that whatever is chosen covers the truth at 90–98%: benchmarks/README.md, "Ground truth"):

- every method: the mean full-sequence ratio p1/p0 of every prompt in [1/``RATIO_BAND``,
  ``RATIO_BAND``] (it is 1 under p0; far from 1, p1's mass lies where no sample went).
- ``cv``, ``pd`` are unbiased but unbounded: they rely on E_p0[ρ_t] = 1 holding *in the sample*,
  i.e. on prefix ratios that many rows share: the smallest per-(prompt, position) prefix ESS / G
  ≥ ``CV_PREFIX_ESS`` for ``cv`` (its leave-one-out control makes rows dependent, and its SE,
  which treats them as independent, falls short once the weights spread) and ≥
  ``PD_PREFIX_ESS`` for ``pd``.
- ``pd_sn`` is bounded by the data (a weighted mean of observed entropies per position) but
  biased when the prefix weights spread: it is the fallback when ``pd``'s value breaks a bound,
  with the same prefix-ESS floor ``SN_PREFIX_ESS`` (below it, pd_sn covered the truth in 5 of the 8 sets where it would have been chosen).
- SNIS: the pooled ESS / S ≥ ``SNIS_ESS``, and every prompt has G_p ≥ exp(KL_p) samples
  (Chatterjee & Diaconis 2018: fewer cannot reach where p1 puts its mass).
- with a proposal q ≠ p0 (results carrying ``proposal``), H0 is weighted too: every method needs
  the pooled ESS / S of p0/q ≥ ``PROPOSAL_ESS`` and its mean ratio per prompt in the same band
  as p1's, and a per-decision method its own floor on the p0/q prefix ESS / G. Without q no
  check is added and the policy is exactly as above.

On the steps where no per-decision method qualifies (prefix ESS / G < 0.3: an SFT step at SGD lr
3e-3, truth ΔH −6.2 nats) every method's interval covered the truth in only 39–91% of sets at
G = 8 and 16, so
the policy reports "not valid" there rather than a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from isdelta.estimators.inputs import check_support_size
from isdelta.estimators.proposal import PROPOSAL_ESS
from isdelta.estimators.results import KHAT_ESS_GATE, EntropyDelta, Estimate, TokenDelta

__all__ = ["METHOD_CODES", "SUPPORT_MAX", "Check", "Headline", "bounds", "headline"]

# Chosen on the ground-truth grid (8 real SmolLM2 steps × G = 8, 16, 64; 832 sample sets): with
# these, 87% of sets are valid and every method chosen covers the truth in ≥ 90% of the sets of
# every (step, G) where it was chosen (cv 98% of 509, pd 96% of 210 overall). Looser ones let
# pd_sn and SNIS in on heavy steps, where they covered 0–75%.
CV_PREFIX_ESS = 0.9  # cv: smallest prefix ESS / G
PD_PREFIX_ESS = 0.3  # pd: smallest prefix ESS / G
SN_PREFIX_ESS = 0.3  # pd_sn: smallest prefix ESS / G (a fallback for pd out of bounds)
RATIO_BAND = 2.0  # every method: mean full-sequence ratio per prompt within [1/2, 2]
SNIS_ESS = 0.5  # SNIS: pooled ESS / S
# the support of a next-token distribution when the caller does not give one: token ids are 32-bit
# integers (tokenizers, SentencePiece, tiktoken), so no vocabulary is larger; ln 2^32 = 22.2 nats
SUPPORT_MAX = 2**32
# a number per method for metrics loggers (entropy/method); 0: no valid estimate
METHOD_CODES = {"none": 0, "snis": 1, "snis_rb": 2, "pd_sn": 3, "cv": 4, "pd": 5}


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
        return {"name": self.name, "value": v, "op": self.op, "threshold": self.threshold, "passed": self.passed}


@dataclass(frozen=True)
class Headline:
    """The step's one number, by :func:`headline`.

    Attributes
    ----------
    valid : bool
        Some method's preconditions and the physical bounds hold; False: report no number.
    method : str
        "cv", "pd", "pd_sn", "snis_rb" or "snis" (the chosen one), "none" when not valid.
    why : str
        Which checks chose it (or, when not valid, that none qualified).
    reason, advice : str or None
        When not valid: the failed checks of every method, and what would make the step
        readable (samples per prompt, or a smaller step).
    delta, delta_tok, h0, h1, h0_tok, h1_tok : Estimate or None
        The chosen method's estimates (None when not valid).
    checks : dict of str -> tuple of Check
        Every candidate method's preconditions and bounds as evaluated, in the order tried.
    """

    valid: bool
    method: str
    why: str
    reason: str | None = None
    advice: str | None = None
    delta: Estimate | None = None
    delta_tok: Estimate | None = None
    h0: Estimate | None = None
    h1: Estimate | None = None
    h0_tok: Estimate | None = None
    h1_tok: Estimate | None = None
    checks: dict = field(default_factory=dict)

    @property
    def code(self) -> int:
        """``METHOD_CODES[method]``: the method as a number for a metrics logger."""
        return METHOD_CODES[self.method]

    def to_dict(self) -> dict:
        out = {
            "valid": self.valid,
            "method": self.method,
            "why": self.why,
            "reason": self.reason,
            "advice": self.advice,
            "code": self.code,
        }
        for k in ("delta", "delta_tok", "h0", "h1", "h0_tok", "h1_tok"):
            e = getattr(self, k)
            out[k] = None if e is None else e.to_dict()
        out["checks"] = {m: [c.to_dict() for c in cs] for m, cs in self.checks.items()}
        return out

    def __str__(self) -> str:
        if not self.valid:
            return f"ΔH not valid: {self.reason} {self.advice or ''}".rstrip()
        return f"ΔH = {self.delta} per sequence; per token {self.delta_tok} — {self.method} ({self.why})"


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


def _coverage_checks(snis: EntropyDelta) -> list[Check]:
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


def _per_decision_checks(tok: TokenDelta) -> list[Check]:
    checks = [Check("prefix ESS / G (smallest)", tok.prefix_ess_frac_min, "≥", PREFIX_ESS[tok.method])]
    if tok.proposal is not None:  # H0's prefix ratios p0/q rest on the same kind of sample
        frac = tok.proposal.prefix_ess_frac_min
        checks.append(Check("prefix ESS / G of p0/q (smallest)", frac, "≥", PREFIX_ESS[tok.method]))
    return checks


def _samples_over_exp_kl(g: int, kl: float) -> float:
    """G / exp(KL) in log space: exp(KL) over- or underflows after a large step (KL = −10⁴ gave
    G / 0); nan stays nan, so the check fails. A KL below −log 2 cannot pass the policy anyway:
    Σ w̄ ℓ = log mean r + KL(w̄ ‖ uniform) ≥ log mean r, so that prompt's mean ratio is below 1/2."""
    return math.exp(min(math.log(max(g, 1)) - kl, 700.0))


def _snis_checks(snis: EntropyDelta) -> list[Check]:
    return [
        Check("ESS / S (pooled)", snis.ess_frac, "≥", SNIS_ESS),
        Check(
            "samples per prompt / exp(KL) (smallest prompt vs largest KL)",
            _samples_over_exp_kl(snis.g_min, snis.kl_max),
            "≥",
            1.0,
        ),
    ]


def _advice(snis: EntropyDelta) -> str:
    """Samples per prompt, or the factor by which to shrink the step, that would make SNIS read."""
    G = snis.g_min
    ess_frac = snis.ess_frac if snis.ess_frac > 1e-12 else 1e-12  # nan or 0: as small as it gets
    # at least twice the samples: a check failing at G says nothing finer about what would pass
    need = max(math.exp(min(snis.kl_max, 700.0)), G * SNIS_ESS / ess_frac, 2 * G)
    # KL grows as the step squared; ESS/S ≈ exp(−2 KL) for small steps (log-normal weights)
    target = min(math.log(max(G, 2)), -math.log(SNIS_ESS) / 2)
    shrink = math.sqrt(max(snis.kl_max, 1e-12) / target)
    need_txt = f"{need:.3g}" if need < 1e9 else "more than 10⁹"
    smaller = f"a step about {max(shrink, 1.0):.2g}× smaller" if shrink < 1e6 else "a step many times smaller"
    if not snis.kl_max >= 0:  # a self-normalised KL below 0: p1's mass lies where no sample went
        return (
            f"ESS {snis.ess:.1f} of {snis.n_rows} rows, and KL(p1‖p0) not estimable from these samples (its "
            f"importance-sampling estimate is below 0, so p1's mass lies where they did not go): far more than "
            f"{G} samples per prompt, or a much smaller step, would make it readable."
        )
    return (
        f"ESS {snis.ess:.1f} of {snis.n_rows} rows, KL(p1‖p0) up to {snis.kl_max:.3g} nats: about {need_txt} "
        f"samples per prompt (now {G}), or {smaller}, would make it readable."
    )


def headline(snis: EntropyDelta, *per_decision: TokenDelta | None, support_size: int | None = None) -> Headline:
    """The step's headline ΔH by the policy of DESIGN.md §5.4 (module docstring).

    Parameters
    ----------
    snis : EntropyDelta
        ``estimate`` on the step's rows (Rao–Blackwellised estimates are used when present).
    *per_decision : TokenDelta or None
        ``estimate_tokens`` results on the same rows, tried first and in this order (e.g. the
        ``cv`` one, then the ``pd_sn`` one); None entries are skipped.
    support_size : int, optional
        Tokens a next-token distribution can spread over (the vocabulary, or top-k): per-token
        entropies above log of it are impossible. None: ``SUPPORT_MAX`` = 2^32.

    Returns
    -------
    Headline

    Raises
    ------
    TypeError
        ``snis`` is not an ``EntropyDelta`` (None, or a ``TokenDelta`` put first), a
        ``per_decision`` entry is not a ``TokenDelta`` or None (e.g. a list left packed), or
        ``support_size`` is not an int.
    ValueError
        ``support_size`` < 1, or the results describe different rows (their fingerprints
        differ: another N, prompt layout, lengths or log p0): combining them would give a number
        that belongs to no sample.
    """
    _check_arguments(snis, per_decision, support_size)
    _check_same_rows(snis, per_decision)
    per_decision = tuple(tok for tok in per_decision if tok is not None)
    if snis.khat_status == "very bad":  # no method survives an infinite-mean ratio
        reason = (
            f"k̂ = {snis.khat:.2f} > 1 with ESS/S {snis.ess_frac:.2f} < {KHAT_ESS_GATE}: the ratios p1/p0 look "
            "like they have no finite mean under p0, so no importance-sampling estimate of H1 or ΔH is "
            "reliable at any sample size."
        )
        return Headline(
            False,
            "none",
            "k̂ > 1",
            reason=reason,
            advice=_advice(snis),
            checks={"all": (Check("Pareto k̂ of the sequence ratios", snis.khat, "≤", 1.0),)},
        )
    rb = snis.delta_rb is not None
    snis_view = _SnisView(snis, rb)
    candidates: list[tuple[str, object, list[Check], list[Check]]] = [
        (tok.method, tok, _per_decision_checks(tok), _token_bounds(tok, support_size)) for tok in per_decision
    ]
    candidates.append(("snis_rb" if rb else "snis", snis_view, _snis_checks(snis), bounds(snis_view, support_size)))
    checks: dict[str, tuple[Check, ...]] = {}
    coverage = _coverage_checks(snis)
    for method, _, pre, bound in candidates:  # every candidate's checks, for the record
        checks[method] = tuple(coverage + pre + bound)
    for method, est, pre, _ in candidates:
        if all(c.passed for c in checks[method]):
            why = "; ".join(str(c) for c in coverage + pre)
            picked = {k: getattr(est, k) for k in ("delta", "delta_tok", "h0", "h1", "h0_tok", "h1_tok")}
            return Headline(True, method, why, **picked, checks=checks)
    failed = "; ".join(f"{m}: " + ", ".join(str(c) for c in cs if not c.passed) for m, cs in checks.items())
    return Headline(
        False,
        "none",
        "no method's preconditions hold on this sample",
        reason=failed,
        advice=_advice(snis),
        checks=checks,
    )


def _token_bounds(tok: TokenDelta, support_size: int | None) -> list[Check]:
    """``bounds`` of a per-decision result, and any that ``estimate_tokens`` found broken under
    its own ``support_size`` (one the headline was not given)."""
    checks = bounds(tok, support_size, tok.max_length)
    if tok.out_of_bounds:
        n = len(tok.out_of_bounds)
        checks.append(Check(f"bounds estimate_tokens found broken ({'; '.join(tok.out_of_bounds)})", n, "≤", 0))
    return checks


def _check_arguments(snis, per_decision: tuple, support_size) -> None:
    """TypeError / ValueError naming the argument: what arrived, what is expected, the fix."""
    order = "headline(estimate(...), estimate_tokens(..., method='cv'), ...): the EntropyDelta first"
    if not isinstance(snis, EntropyDelta):
        got = "a TokenDelta (estimate_tokens' result)" if isinstance(snis, TokenDelta) else type(snis).__name__
        raise TypeError(f"snis: expected the EntropyDelta that estimate(...) returns, got {got}; call {order}.")
    for k, tok in enumerate(per_decision):
        if tok is None:
            continue
        if isinstance(tok, TokenDelta):
            if tok.method not in PREFIX_ESS:
                raise ValueError(
                    f"per_decision[{k}]: expected a TokenDelta of method {list(PREFIX_ESS)}, got method "
                    f"{tok.method!r}; pass estimate_tokens(...) results unchanged."
                )
            continue
        if isinstance(tok, EntropyDelta):
            got = "an EntropyDelta: only the first argument is estimate(...)'s result"
        elif isinstance(tok, (list, tuple)):
            got = f"a {type(tok).__name__}: unpack it, headline(snis, *per_decision)"
        else:
            got = type(tok).__name__
        raise TypeError(f"per_decision[{k}]: expected a TokenDelta (estimate_tokens' result) or None, got {got}.")
    check_support_size(support_size)


def _check_same_rows(snis: EntropyDelta, per_decision: tuple[TokenDelta | None, ...]) -> None:
    """ValueError when two results carry fingerprints of different rows (those without one,
    built by hand, are not compared)."""
    named = [("snis", snis)]
    named += [(f"per_decision[{k}] ({tok.method})", tok) for k, tok in enumerate(per_decision) if tok is not None]
    named = [(name, res.fingerprint) for name, res in named if getattr(res, "fingerprint", None) is not None]
    for name, fp in named[1:]:
        why = named[0][1].differs(fp)
        if why is not None:
            raise ValueError(
                f"{named[0][0]}, {name}: expected results of the same rows, got {why}. The headline "
                "chooses among estimates of one sample set: call estimate(...) and estimate_tokens(...) "
                "on the same rows, in the same order, with the same group."
            )


@dataclass(frozen=True)
class _SnisView:
    """Sequence-level SNIS estimates as one method: the Rao–Blackwellised ones when present."""

    res: EntropyDelta
    rb: bool

    def __getattr__(self, name: str) -> Estimate:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.res, f"{name}_rb" if self.rb else name)
