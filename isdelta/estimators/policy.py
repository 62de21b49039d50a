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

Two verdicts (issue 26). ``valid`` is the sequence level, ``valid_tok`` the per-token one. A
method gives both when all its checks hold; when none does, the first per-decision method whose
checks hold at the per-token level gives that level alone (``valid=False, valid_tok=True``, the
reason naming the sequence-level checks that failed). The checks that gate only the sequence
level: the bounds "per sequence" (H1 ≥ 0, ≤ C·ln|support|, ΔH ≥ −H0), the Pareto k̂ of the
method's per-row terms of ΔH per sequence ≤ ``TERMS_KHAT``, and the length shift
|E_p1[L] / E_p0[L] − 1| ≤ ``LENGTH_SHIFT``. ΔH per sequence sums a change over every position of a
completion: when p1 moves the length distribution, its per-row terms are dominated by the few
completions p1 favours (a heavy tail: the interval's SE has no footing), and the sample cannot
tell which of its sets missed them. The per-token rate, a ratio of two sums over the same prefix
weights, cancels most of that; it needs only k̂ of its own terms ≤ ``TERMS_KHAT_TOK``. SNIS weighs a
whole completion by its full-sequence ratio, so it is never the per-token-only headline. The k̂
checks need ``MIN_TAIL_FIT`` = 25 nonzero terms; with fewer rows they are left out, except that
the sequence level is refused when its tail cannot be checked on completions averaging more than
``TAIL_UNCHECKED_TOKENS`` = 64 tokens (at 512 tokens, G = 8 × 2 prompts, the sets kept without it
covered 4 of 6). On the real
model (``benchmarks/bench_truth.py --suite long``, 128 and 512 tokens) and on a bigram model with
exact entropies (``tests/estimators/test_long_completions.py``): benchmarks/README.md, "Long
completions".

On the steps where no per-decision method qualifies (prefix ESS / G < 0.3: an SFT step at SGD lr
3e-3, truth ΔH −6.2 nats) every method's interval covered the truth in only 39–91% of sets at
G = 8 and 16, so
the policy reports "not valid" there rather than a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from isdelta.estimators.checks import (  # noqa: F401 (the thresholds: importable from here, as before)
    CV_PREFIX_ESS,
    LENGTH_SHIFT,
    PD_PREFIX_ESS,
    PER_SEQUENCE,
    PREFIX_ESS,
    RATIO_BAND,
    SEQUENCE_ONLY,
    SN_PREFIX_ESS,
    SNIS_ESS,
    SUPPORT_MAX,
    TERMS_KHAT,
    TERMS_KHAT_TOK,
    Check,
    bounds,
    coverage_checks,
    per_decision_checks,
    sequence_checks,
    snis_checks,
    token_bounds,
    token_checks,
)
from isdelta.estimators.inputs import check_support_size
from isdelta.estimators.results import KHAT_ESS_GATE, EntropyDelta, Estimate, TokenDelta

__all__ = ["METHOD_CODES", "SUPPORT_MAX", "Check", "Headline", "bounds", "headline"]

# a number per method for metrics loggers (entropy/method); 0: no valid estimate
METHOD_CODES = {"none": 0, "snis": 1, "snis_rb": 2, "pd_sn": 3, "cv": 4, "pd": 5}


@dataclass(frozen=True)
class Headline:
    """The step's one number, by :func:`headline`.

    Attributes
    ----------
    valid : bool
        The sequence-level verdict: some method's preconditions, the physical bounds and the
        sequence-level check hold; False: report no number per sequence.
    method : str
        "cv", "pd", "pd_sn", "snis_rb" or "snis" (the chosen one), "none" when neither level
        is valid.
    why : str
        Which checks chose it (or, when not valid, that none qualified).
    reason, advice : str or None
        When ``valid`` is False: the failed checks (of every method, or, when only the per-token
        level holds, the sequence-level ones of the chosen method), and what would make the step
        readable (samples per prompt, or a smaller step).
    delta, delta_tok, h0, h1, h0_tok, h1_tok : Estimate or None
        The chosen method's estimates; the per-sequence ones are None unless ``valid``, the
        ``_tok`` ones None unless ``valid_tok``.
    valid_tok : bool
        The per-token verdict: True whenever ``valid`` is, and also where only the sequence
        level fails (``reason`` says why; ``SEQUENCE_ONLY``).
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
    valid_tok: bool | None = None  # None: the same as ``valid`` (a verdict built by hand)

    def __post_init__(self) -> None:
        if self.valid_tok is None:
            object.__setattr__(self, "valid_tok", self.valid)

    @property
    def code(self) -> int:
        """``METHOD_CODES[method]``: the method as a number for a metrics logger."""
        return METHOD_CODES[self.method]

    def to_dict(self) -> dict:
        out = {
            "valid": self.valid,
            "valid_tok": self.valid_tok,
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
        if self.valid_tok and not self.valid:
            return f"ΔH per token {self.delta_tok} — {self.method}; per sequence not valid: {self.reason}"
        if not self.valid:
            return f"ΔH not valid: {self.reason} {self.advice or ''}".rstrip()
        return f"ΔH = {self.delta} per sequence; per token {self.delta_tok} — {self.method} ({self.why})"


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
        (tok.method, tok, per_decision_checks(tok), token_bounds(tok, support_size)) for tok in per_decision
    ]
    candidates.append(("snis_rb" if rb else "snis", snis_view, snis_checks(snis), bounds(snis_view, support_size)))
    first = per_decision[0] if per_decision else None
    lengths = next((t for t in per_decision if t.method == "pd_sn"), first)  # E_p1[L] for the length shift
    coverage = coverage_checks(snis)
    checks: dict[str, tuple[Check, ...]] = {}  # every candidate's checks, for the record
    levels: dict[str, tuple[list[Check], list[Check], list[Check]]] = {}  # (per token, per sequence, length)
    for method, est, pre, bound in candidates:
        length, tok = sequence_checks(est, first, lengths), token_checks(est, first)
        seq = [c for c in bound if PER_SEQUENCE in c.name] + length
        levels[method] = (coverage + pre + tok + [c for c in bound if PER_SEQUENCE not in c.name], seq, length)
        checks[method] = tuple(coverage + pre + tok + bound + length)
    for method, est, pre, _ in candidates:  # both levels: the first method all of whose checks hold
        if all(c.passed for c in checks[method]):
            why = "; ".join(str(c) for c in coverage + pre + levels[method][2])
            picked = {k: getattr(est, k) for k in ("delta", "delta_tok", "h0", "h1", "h0_tok", "h1_tok")}
            return Headline(True, method, why, **picked, checks=checks)
    failed = "; ".join(f"{m}: " + ", ".join(str(c) for c in cs if not c.passed) for m, cs in checks.items())
    for method, est, pre, _ in candidates:  # the per-token level alone: the sequence level cannot be read
        per_token, seq, length = levels[method]
        # SNIS weighs a whole completion by its full-sequence ratio: its per-token rate rests on the
        # same weights as its per-sequence figure, so it is not read when that one is not; nor is a
        # method whose per-sequence figure breaks a physical bound (its weights fail E_p0[ρ] = 1)
        broken = [c for c in seq if c not in length and not c.passed]
        if all(c.passed for c in per_token) and not broken and not method.startswith("snis"):
            why = "; ".join(str(c) for c in coverage + pre)
            reason = (
                f"the per-sequence estimate cannot be read on this sample ({method}: "
                + ", ".join(str(c) for c in seq if not c.passed)
                + "); the per-token rate holds: "
                + SEQUENCE_ONLY
            )
            tok_fields = {k: getattr(est, k) for k in ("delta_tok", "h0_tok", "h1_tok")}
            return Headline(
                False, method, why, reason=reason, advice=_advice(snis), checks=checks, valid_tok=True, **tok_fields
            )
    return Headline(
        False,
        "none",
        "no method's preconditions hold on this sample",
        reason=failed,
        advice=_advice(snis),
        checks=checks,
    )


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
