"""Long completions (issue 26): where the per-sequence interval cannot be trusted, the headline
refuses the sequence level with its reason and keeps a per-token value that covers the truth.

The model is small enough for the exact truth: a bigram language model over V = 12 tokens (token
0 stops a completion) writing completions of up to C = 128 tokens from 4 prompts (their first
token). p1 is p0 with every transition's logits moved along one random direction, stopping made
rarer: the step lengthens completions, as RL on reasoning prompts does. H(p) per sequence and
per token are exact, by carrying the distribution of the last token through the C positions.

What goes wrong without the sequence-level checks (the trajectory demo's observation in miniature):
the per-sequence ΔH sums a change over ~100 positions, and its per-row terms are dominated by the
few long completions that p1 favours, so they are strongly skewed; with 64 rows per sample set the
normal interval of every method covers the truth far less often than 95%. The per-token rate, a
ratio of two such sums over the same weights, has nearly symmetric terms and its interval holds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest

from isdelta.estimators import EstimatorWarning, estimate, estimate_tokens, headline
from isdelta.estimators.checks import sequence_checks, token_checks

V, P, G = 12, 4, 16
STARTS = (1, 2, 3, 4)
Z95 = 1.959963984540054


def bigram(alpha: float, eos0: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Transition matrices [V, V] of p0 and p1 (rows: the last token; column 0: stop)."""
    rng = np.random.default_rng(seed)
    logits0 = rng.normal(0.0, 1.5, (V, V))
    logits0[:, 0] += eos0
    direction = rng.normal(0.0, 0.3, (V, V))
    direction[:, 0] = -3.0  # p1 stops less often
    out = []
    for logits in (logits0, logits0 + alpha * direction):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return out[0], out[1]


def entropies(P_: np.ndarray) -> np.ndarray:
    return -(P_ * np.log(P_)).sum(axis=1)


def exact(P_: np.ndarray, C: int) -> tuple[float, float]:
    """(H per sequence, averaged over the prompts; H per token, Σ_p E[Σ_t H_t] / Σ_p E[L])."""
    H = entropies(P_)
    hs, ls = [], []
    for s in STARTS:
        alive = np.zeros(V)
        alive[s] = 1.0  # the distribution of the last token among completions still going
        h = length = 0.0
        for _ in range(C):
            h += alive @ H
            length += alive.sum()
            alive = alive @ P_
            alive[0] = 0.0  # stopped
        hs.append(h)
        ls.append(length)
    return float(np.mean(hs)), float(np.sum(hs) / np.sum(ls))


def sample_set(P0: np.ndarray, P1: np.ndarray, C: int, rng) -> dict:
    """G completions per prompt from p0, scored under both models: the engine's arrays."""
    N = P * G
    out = {k: np.zeros((N, C)) for k in ("lp0", "lp1", "e0", "e1")}
    mask = np.zeros((N, C), bool)
    H0, H1 = entropies(P0), entropies(P1)
    state, alive = np.repeat(np.array(STARTS), G), np.ones(N, bool)
    cum = P0.cumsum(axis=1)
    for t in range(C):
        x = np.minimum((rng.random(N)[:, None] > cum[state]).sum(axis=1), V - 1)
        mask[:, t] = alive
        out["lp0"][:, t], out["lp1"][:, t] = np.log(P0[state, x]), np.log(P1[state, x])
        out["e0"][:, t], out["e1"][:, t] = H0[state], H1[state]
        alive &= x != 0
        state = x
    return {**out, "mask": mask, "group": np.repeat(np.arange(P), G)}


def verdicts(alpha: float, eos0: float, C: int, n_sets: int, seed: int = 1):
    """Per sample set: the headline, and the truth (ΔH per sequence, per token)."""
    P0, P1 = bigram(alpha, eos0)
    (h0, h0_tok), (h1, h1_tok) = exact(P0, C), exact(P1, C)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sets):
        s = sample_set(P0, P1, C, rng)
        m = s["mask"]

        def rows(x, m=m):
            return np.where(m, x, 0.0).sum(axis=1)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)
            res = estimate(
                rows(s["lp0"]),
                rows(s["lp1"]),
                m.sum(1),
                s["group"],
                entropy_sum0=rows(s["e0"]),
                entropy_sum1=rows(s["e1"]),
            )
            toks = [
                estimate_tokens(s["lp0"], s["lp1"], s["e0"], s["e1"], m, s["group"], method=k)
                for k in ("cv", "pd", "pd_sn")
            ]
        out.append((headline(res, *toks, support_size=V), toks, res))
    return out, (h1 - h0, h1_tok - h0_tok)


def covers(est, truth: float) -> bool:
    return abs(est.value - truth) <= Z95 * est.se


@pytest.fixture(scope="module")
def long_step():
    """A step that lengthens completions of up to 128 tokens (mean ~10 under p0, long tail)."""
    return verdicts(alpha=0.3, eos0=0.0, C=128, n_sets=60)


def test_the_sequence_level_is_refused_with_its_reason_and_the_per_token_value_covers(long_step):
    sets, (delta, delta_tok) = long_step
    assert delta > 10 * abs(delta_tok)  # the change is in the length: large per sequence, small per token
    # without the sequence-level checks every method's per-sequence interval covers far below 95%
    for k, method in enumerate(("cv", "pd", "pd_sn")):
        rate = np.mean([covers(toks[k].delta, delta) for _, toks, _ in sets])
        assert rate < 0.85, (method, rate)
    heads = [h for h, _, _ in sets]
    refused = [h for h in heads if not h.valid]
    assert len(refused) >= 0.9 * len(heads)
    assert all(h.delta is None and h.h1 is None for h in refused)
    kept = [h for h in refused if h.valid_tok]
    assert len(kept) >= 0.25 * len(heads)  # the per-token level holds where a per-decision method's checks do
    for h in kept:
        assert "per-sequence estimate cannot be read" in h.reason and "per sequence" in h.reason
        assert h.method in ("cv", "pd", "pd_sn") and h.delta_tok is not None
    coverage_tok = np.mean([covers(h.delta_tok, delta_tok) for h in kept])
    assert coverage_tok >= 0.9, coverage_tok


def test_short_completions_of_the_same_model_keep_both_levels():
    """The same kind of step on completions that stop within a few tokens: no false alarm."""
    sets, (delta, delta_tok) = verdicts(alpha=0.05, eos0=4.0, C=8, n_sets=40)
    heads = [h for h, _, _ in sets]
    assert np.mean([h.valid for h in heads]) >= 0.9
    valid = [h for h in heads if h.valid]
    assert np.mean([covers(h.delta, delta) for h in valid]) >= 0.85
    assert all(h.valid_tok for h in valid)
    assert math.isfinite(delta) and math.isfinite(delta_tok)


def test_an_unchecked_tail_refuses_the_sequence_level_on_long_completions_only(long_step):
    """Too few rows to fit k̂ of the per-sequence terms: refused when completions average more than
    64 tokens (at 512 tokens and 16 rows the sets kept without a tail check covered 4 of 6), left
    out below (short answers: nothing to refuse on)."""
    _, toks, _ = long_step[0][0]
    few = replace(toks[0], terms_khat=None, mean_length0=100.0, mean_length1=100.0)
    failed = [c for c in sequence_checks(few, few) if not c.passed]
    assert len(failed) == 1 and "not estimable (< 25 nonzero terms) at 100 tokens > 64" in failed[0].name
    assert "per sequence" in failed[0].name  # gates the sequence level only
    short = replace(few, mean_length0=40.0, mean_length1=40.0)
    assert all(c.passed for c in sequence_checks(short, short))
    assert token_checks(few, few) == [] or all(c.passed for c in token_checks(few, few))
