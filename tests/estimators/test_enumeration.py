"""Exact enumeration: CI coverage, Rao–Blackwell SE, bias vs S, no-EOS, sampled prompts.

Reference: ``toy.TabularToy``, whose every completion is enumerated, so H(p0), H(p1), the
entropy rates and their no-EOS variants are known exactly. All repetitions are seeded; the
coverage bands (91–99 % for a 95 % CI over 400 repetitions, ±3 binomial SE) fail if the
SE is off by more than about 15 % either way.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from toy import TabularToy

from isdelta.estimators import estimate

REPS = 400
COVERAGE_BAND = (0.91, 0.99)
SCORE_KEYS = ("log_p0", "log_p1", "length", "entropy_sum0", "entropy_sum1")
EOS_KEYS = ("stopped", "eos_logp0", "eos_logp1", "eos_entropy_sum0", "eos_entropy_sum1")


@functools.cache
def _toy() -> TabularToy:
    return TabularToy(n_prompts=4, vocab=4, depth=4, seed=0)


def _truth(alpha: float, suffix: str = "") -> dict[str, float]:
    e0, e1 = _toy().enumerate(0.0).exact(), _toy().enumerate(alpha).exact()
    return {"delta": e1["h" + suffix] - e0["h" + suffix], "delta_tok": e1["h_tok" + suffix] - e0["h_tok" + suffix]}


@functools.cache
def _replicate(alpha: float, g: int, weights: str = "none", include: str = "all", reps: int = REPS):
    """``reps`` seeded estimates, each from G fresh samples per prompt of p0 (α = 0)."""
    toy = _toy()
    ids = toy.sample(np.random.default_rng(1000 + g), 0.0, reps, g)  # [reps, P, G]
    rows = toy.rows(ids, 0.0, alpha)
    keys = SCORE_KEYS + (EOS_KEYS if include == "no_eos" else ())
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k̂ warnings are expected at the larger steps
        for r in range(reps):
            out.append(estimate(**{k: rows[k][r] for k in keys}, weights=weights, include=include))
    return tuple(out)


def _coverage(results, name: str, truth: float) -> float:
    return float(np.mean([getattr(res, name).covers(truth) for res in results]))


def test_toy_is_a_normalised_distribution_and_obeys_the_chain_rule():
    toy = _toy()
    for alpha in (0.0, 0.6):
        e = toy.enumerate(alpha)
        np.testing.assert_allclose(e.prob.sum(1), 1.0, rtol=1e-12)
        exact = e.exact()
        # E_p[Σ_t H(next | prefix)] = H(p): what makes the Rao–Blackwellised estimator valid
        assert exact["h_chain_rule"] == pytest.approx(exact["h"], rel=1e-12)
        # without the stop position: the non-stop share of H_t at every position (tower rule)
        assert exact["h_no_eos_chain_rule"] == pytest.approx(exact["h_no_eos"], rel=1e-12)
    assert toy.n_sequences == 1 + 3 + 9 + 27 + 81


def test_toy_sampler_draws_the_enumerated_distribution():
    toy = _toy()
    ids = toy.sample(np.random.default_rng(0), 0.3, 200, 500)  # [200, P, 500]
    prob = toy.enumerate(0.3).prob
    for p in range(toy.n_prompts):
        freq = np.bincount(ids[:, p].ravel(), minlength=toy.n_sequences) / ids[:, p].size
        se = np.sqrt(prob[p] * (1 - prob[p]) / ids[:, p].size)
        assert np.all(np.abs(freq - prob[p]) < 5 * se + 1e-12)


@pytest.mark.parametrize("alpha, g, weights", [(0.3, 64, "none"), (0.6, 128, "none"), (0.6, 128, "psis")])
def test_ci_covers_exact_delta(alpha, g, weights):
    results = _replicate(alpha, g, weights)
    truth = _truth(alpha)
    assert np.mean([res.ess_frac for res in results]) >= 0.3  # the regime the claim is about
    for name in ("delta", "delta_tok", "delta_rb", "delta_tok_rb"):
        cov = _coverage(results, name, truth[name.removesuffix("_rb")])
        assert COVERAGE_BAND[0] <= cov <= COVERAGE_BAND[1], (name, cov)


@pytest.mark.parametrize("alpha, g", [(0.3, 64), (0.6, 128)])
def test_se_matches_spread_over_repetitions(alpha, g):
    """The influence-function SE agrees with the Monte-Carlo sd of the estimate (±15 %)."""
    results = _replicate(alpha, g)
    for name in ("h0", "h1", "delta", "delta_tok", "delta_rb", "delta_tok_rb"):
        values = np.array([getattr(res, name).value for res in results])
        mean_se = np.mean([getattr(res, name).se for res in results])
        assert mean_se == pytest.approx(values.std(ddof=1), rel=0.15), name


def test_rao_blackwellised_se_is_smaller():
    results = _replicate(0.6, 128)
    for name in ("h0", "h1", "delta", "h0_tok", "delta_tok"):
        plain = np.mean([getattr(res, name).se for res in results])
        rb = np.mean([getattr(res, name + "_rb").se for res in results])
        assert rb < 0.95 * plain, (name, rb, plain)


def test_bias_shrinks_as_samples_per_prompt_grow():
    """SNIS is biased at O(1/S): at a large step the bias is clear at S = 8 and fades by 128."""
    alpha, truth = 1.0, _truth(1.0)
    bias, mc_se = {}, {}
    for g in (8, 32, 128):
        err = np.array([res.delta.value for res in _replicate(alpha, g, reps=300)]) - truth["delta"]
        bias[g], mc_se[g] = err.mean(), err.std(ddof=1) / np.sqrt(err.size)
    assert abs(bias[8]) > 5 * mc_se[8]  # real bias, not noise
    assert abs(bias[8]) > abs(bias[32]) > abs(bias[128])
    assert abs(bias[128]) < abs(bias[8]) / 4


def test_no_eos_targets_the_entropy_without_the_stop_position():
    alpha = 0.6
    results = _replicate(alpha, 128, include="no_eos")
    truth = _truth(alpha, "_no_eos")
    for name in ("delta", "delta_tok", "delta_rb", "delta_tok_rb"):
        cov = _coverage(results, name, truth[name.removesuffix("_rb")])
        assert COVERAGE_BAND[0] <= cov <= COVERAGE_BAND[1], (name, cov)
    # the average over repetitions sits on the no-EOS target (up to SNIS's O(1/S) bias),
    # far from the all-positions one
    with_eos = _truth(alpha)
    for name in ("delta", "delta_tok", "delta_rb", "delta_tok_rb"):
        key = name.removesuffix("_rb")
        values = np.array([getattr(res, name).value for res in results])
        mc_se = values.std(ddof=1) / np.sqrt(values.size)
        assert abs(values.mean() - truth[key]) < abs(values.mean() - with_eos[key]) / 4, name
        assert abs(values.mean() - with_eos[key]) > 10 * mc_se, name


def test_sampled_prompts_se_covers_the_population_mean():
    """Prompts drawn from a population of 200: the between-prompt SE covers the population
    ΔH; the fixed-prompt SE, which ignores prompt-to-prompt variation, must not."""
    pop, alpha, g, n_prompts, reps = TabularToy(n_prompts=200, seed=1), 0.3, 32, 20, 200
    e0, e1 = pop.enumerate(0.0), pop.enumerate(alpha)
    mu = float(np.mean((e1.prob * -e1.logp).sum(1) - (e0.prob * -e0.logp).sum(1)))
    rng = np.random.default_rng(5)
    rows = pop.rows(pop.sample(rng, 0.0, reps, g), 0.0, alpha)  # [reps, 200, G]
    hits = {"sampled": 0, "fixed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(reps):
            chosen = rng.choice(200, n_prompts, replace=False)
            args = [rows[k][r, chosen] for k in ("log_p0", "log_p1", "length")]
            for mode in hits:
                hits[mode] += estimate(*args, weights="none", prompts=mode).delta.covers(mu)
    assert COVERAGE_BAND[0] <= hits["sampled"] / reps <= COVERAGE_BAND[1]
    assert hits["fixed"] / reps < 0.85


def _exact_delta1(alpha: float, include: str) -> float:
    """Population ΔH₁ = −Cov_p0(S0', ℓ) − E_p0[δ' − ℓ] by enumeration (equal prompt mass)."""
    e0, e1 = _toy().enumerate(0.0), _toy().enumerate(alpha)
    p, log_r = e0.prob, e1.logp - e0.logp
    s0, s1 = e0.logp, e1.logp
    if include == "no_eos":
        s0, s1 = s0 - e0.eos_logp, s1 - e1.eos_logp

    def mean(x: np.ndarray) -> np.ndarray:  # E_p0 within each prompt, [P, 1]
        return (p * x).sum(1, keepdims=True)

    cov = mean((s0 - mean(s0)) * (log_r - mean(log_r)))
    return float(np.mean(-cov - mean((s1 - s0) - log_r)))


@pytest.mark.parametrize("include", ["all", "no_eos"])
def test_delta1_is_the_first_order_change_and_is_estimated_without_bias(include):
    """ΔH₁(α)/α → dH/dα (central difference of the exact entropy), and the estimator's
    average over repetitions hits the exact ΔH₁ while its CI covers it."""
    suffix = "_no_eos" if include == "no_eos" else ""
    eps = 1e-4
    h = {a: _toy().enumerate(a).exact()["h" + suffix] for a in (-eps, eps)}
    derivative = (h[eps] - h[-eps]) / (2 * eps)
    assert _exact_delta1(eps, include) / eps == pytest.approx(derivative, rel=1e-3)
    alpha = 0.3
    truth = _exact_delta1(alpha, include)
    results = _replicate(alpha, 64, include=include)
    values = np.array([res.delta1.value for res in results])
    mc_se = values.std(ddof=1) / np.sqrt(values.size)
    assert abs(values.mean() - truth) < 4 * mc_se
    cov = _coverage(results, "delta1", truth)
    assert COVERAGE_BAND[0] <= cov <= COVERAGE_BAND[1], cov
