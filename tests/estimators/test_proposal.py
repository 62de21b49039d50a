"""Estimation with a proposal q ≠ p0 (DESIGN §5, issue 20): H0 weighted by p0/q, H1 by p1/q.

References: the enumerable toy (``toy.TabularToy``), whose q is p0's next-token logits tilted
along a fixed direction (θ0 − 0.25·Δ), so H(p0), H(p1) and the rates are exact; a naive
per-prompt loop (scipy logsumexp, formulas as written) for the values, SEs and the p0/q
diagnostics; the q-less call itself for "absent changes nothing" and "q = p0 reduces to it".
Coverage bands as in test_enumeration.py (91–99 % over 400 seeded repetitions).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
from conftest import random_rows
from scipy.special import logsumexp
from toy import TabularToy

from isdelta.estimators import estimate, estimate_per_prompt, estimate_tokens, headline
from isdelta.estimators.groups import make_groups
from isdelta.estimators.proposal import GAP_ESS, SamplerGap, sampler_gap
from isdelta.estimators.uncertainty import covariance, weighted_covariance

pytestmark = pytest.mark.filterwarnings("ignore::isdelta.estimators.EstimatorWarning")

REPS = 400
COVERAGE_BAND = (0.91, 0.99)
TOKEN_KEYS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")
NAMES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok")
ALPHA_Q, ALPHA_1, G = -0.25, 0.3, 128  # q: p0's logits tilted by −0.25·Δ; p1 = p0 + 0.3·Δ


@functools.cache
def _toy() -> TabularToy:
    return TabularToy(n_prompts=4, vocab=4, depth=4, seed=0)


@functools.cache
def _samples(alpha_q: float, alpha1: float, g: int, reps: int, seed: int = 11):
    """Rows drawn from q = p_{alpha_q}, scored under p0 (α = 0), p1 and q: (sequence rows with
    ``log_q``, token rows with ``token_logq``), arrays [reps, P, G(, C)]."""
    toy = _toy()
    ids = toy.sample(np.random.default_rng(seed), alpha_q, reps, g)  # [reps, P, G]
    p = np.arange(toy.n_prompts)[:, None]
    rows = toy.rows(ids, 0.0, alpha1)
    rows["log_q"] = toy.enumerate(alpha_q).logp[p, ids]
    tokens = toy.token_rows(ids, 0.0, alpha1)
    tokens["token_logq"] = toy.enumerate_tokens(alpha_q).token_logp[p, ids]
    return rows, tokens


def _truth(alpha1: float) -> dict[str, float]:
    e0, e1 = _toy().enumerate(0.0).exact(), _toy().enumerate(alpha1).exact()
    out = {"h0": e0["h"], "h1": e1["h"], "h0_tok": e0["h_tok"], "h1_tok": e1["h_tok"]}
    return {**out, "delta": out["h1"] - out["h0"], "delta_tok": out["h1_tok"] - out["h0_tok"]}


def _one(rows: dict, tokens: dict, r: int, method: str, q: bool = True):
    """Repetition r by one method: "snis", "snis_psis", "snis_rb" (``estimate``) or a per-decision one."""
    g = rows["log_p0"].shape[-1]
    group = np.repeat(np.arange(_toy().n_prompts), g)
    if method.startswith("snis"):
        kw = {"log_q": rows["log_q"][r]} if q else {}
        if method == "snis_rb":
            kw.update(entropy_sum0=rows["entropy_sum0"][r], entropy_sum1=rows["entropy_sum1"][r])
        scheme = "psis" if method == "snis_psis" else "none"  # PSIS: per-prompt fits on p0/q and p1/q
        return estimate(rows["log_p0"][r], rows["log_p1"][r], rows["length"][r], weights=scheme, **kw)
    c = tokens["mask"].shape[-1]
    arrays = [tokens[k][r].reshape(-1, c) for k in TOKEN_KEYS]
    logq = tokens["token_logq"][r].reshape(-1, c) if q else None
    return estimate_tokens(*arrays, group, method=method, token_logq=logq)


@functools.cache
def _replicate(method: str, q: bool = True):
    rows, tokens = _samples(ALPHA_Q, ALPHA_1, G, REPS)
    return tuple(_one(rows, tokens, r, method, q) for r in range(REPS))


def _field(res, name: str):
    return getattr(res, name + "_rb") if getattr(res, "delta_rb", None) is not None else getattr(res, name)


# ---------------------------------------------------------------------------------------------
# the estimand: exact enumerated H0, H1, ΔH covered at the nominal rate


@pytest.mark.parametrize("method", ["snis", "snis_psis", "snis_rb", "pd", "cv", "pd_sn"])
def test_ci_covers_exact_entropies_when_sampling_from_a_tilted_proposal(method):
    results, truth = _replicate(method), _truth(ALPHA_1)
    assert 0.6 < np.mean([res.proposal.ess_frac for res in results]) < 0.95  # q is clearly not p0
    for name in NAMES:
        cov = np.mean([_field(res, name).covers(truth[name]) for res in results])
        assert COVERAGE_BAND[0] <= cov <= COVERAGE_BAND[1], (name, cov)
        values = np.array([_field(res, name).value for res in results])
        mean_se = np.mean([_field(res, name).se for res in results])
        assert mean_se == pytest.approx(values.std(ddof=1), rel=0.15), name  # the SE is the spread


@pytest.mark.parametrize("method", ["snis", "cv"])
def test_ignoring_the_proposal_misses_h0(method):
    """The same samples read as if drawn from p0: H0 is then E_q[−S0], not H(p0), off by more
    than 2 SE on average, and the CIs of H0 and ΔH cover the truth in well under half the
    repetitions (the weighted ones above: 91–99 %)."""
    results, truth = _replicate(method, q=False), _truth(ALPHA_1)
    err = np.array([res.h0.value for res in results]) - truth["h0"]
    assert abs(err.mean()) > 2 * np.mean([res.h0.se for res in results])
    for name in ("h0", "delta"):
        assert np.mean([getattr(res, name).covers(truth[name]) for res in results]) < 0.45, name


# ---------------------------------------------------------------------------------------------
# absent q changes nothing; q = p0 reduces to the q-less answer


def _assert_same(a, b, path: str = "") -> None:
    """Every field equal bit for bit (arrays elementwise, nan == nan), recursing into results."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True), path
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("weights, clip", [("psis", None), ("none", None), ("truncate", None), ("clip", 2.0)])
@pytest.mark.parametrize("include", ["all", "no_eos"])
def test_log_q_none_changes_no_field(weights, clip, include):
    rows, _ = _samples(0.0, 0.6, 32, 1)
    keys = ["log_p0", "log_p1", "length", "entropy_sum0", "entropy_sum1"]
    if include == "no_eos":
        keys += ["stopped", "eos_logp0", "eos_logp1", "eos_entropy_sum0", "eos_entropy_sum1"]
    kw = {k: rows[k][0] for k in keys} | {"weights": weights, "clip": clip, "include": include}
    base = estimate(**kw)
    res = estimate(**kw, log_q=None)
    _assert_same(base, res)
    assert res.proposal is None and res.to_dict() == base.to_dict()
    assert headline(res).to_dict() == headline(base).to_dict()


@pytest.mark.parametrize("method", ["cv", "pd", "pd_sn"])
def test_token_logq_none_changes_no_field(method):
    rows, tokens = _samples(0.0, 0.6, 16, 1)
    group = np.repeat(np.arange(4), 16)
    arrays = [tokens[k][0].reshape(-1, 4) for k in TOKEN_KEYS]
    base = estimate_tokens(*arrays, group, method=method)
    res = estimate_tokens(*arrays, group, method=method, token_logq=None)
    _assert_same(base, res)
    snis = estimate(rows["log_p0"][0], rows["log_p1"][0], rows["length"][0])
    assert headline(snis, res).to_dict() == headline(snis, base).to_dict()


@pytest.mark.parametrize("weights", ["psis", "none"])
def test_log_q_equal_to_log_p0_gives_the_p0_answer(weights):
    """q = p0: v̄ = 1/G_p as the same float, so every estimate equals the q-less one bit for bit
    except ΔH₁ and the covariance term, whose weighted covariance (÷ (1 − Σ v̄²)) and weighted
    centring only coincide with ddof = 1 up to rounding."""
    rows, _ = _samples(0.0, 0.6, 32, 1)
    kw = {k: rows[k][0] for k in ("log_p0", "log_p1", "length", "entropy_sum0", "entropy_sum1")}
    base = estimate(**kw, weights=weights)
    res = estimate(**kw, weights=weights, log_q=kw["log_p0"])
    for f in dataclasses.fields(base):
        a, b = getattr(base, f.name), getattr(res, f.name)
        if f.name in ("delta1", "cov_term"):
            for k in ("value", "se") if f.name == "delta1" else ():
                assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-12, abs=1e-12)
            if f.name == "cov_term":
                assert b == pytest.approx(a, rel=1e-12, abs=1e-12)
        elif f.name not in ("weights", "proposal"):
            _assert_same(a, b, f.name)
    np.testing.assert_array_equal(res.weights.w, base.weights.w)
    q = res.proposal
    assert q.ess_frac == pytest.approx(1.0, rel=1e-12) and q.mean_ratio_min == q.mean_ratio_max == 1.0
    assert q.kl == 0.0 and np.isnan(q.khat)  # constant ratios: no tail to fit


@pytest.mark.parametrize("method", ["cv", "pd", "pd_sn"])
def test_token_logq_equal_to_token_logp0_gives_the_p0_answer_bit_for_bit(method):
    _, tokens = _samples(0.0, 0.6, 16, 1)
    group = np.repeat(np.arange(4), 16)
    arrays = [tokens[k][0].reshape(-1, 4) for k in TOKEN_KEYS]
    base = estimate_tokens(*arrays, group, method=method)
    res = estimate_tokens(*arrays, group, method=method, token_logq=arrays[0])
    _assert_same(dataclasses.replace(res, proposal=None), base)
    assert res.proposal.prefix_ess_frac_min == 1.0 and res.proposal.ess_frac == pytest.approx(1.0, rel=1e-12)


def test_identical_models_give_zero_exactly_under_a_proposal():
    """p1 = p0 scored on q's samples: the H1 and H0 weights are the same floats (p1/q = p0/q), so
    ΔH = 0 with SE 0 for every method, whatever q is."""
    rows, tokens = _samples(ALPHA_Q, ALPHA_1, 32, 1)
    r = {k: rows[k][0] for k in ("log_p0", "length", "entropy_sum0", "log_q")}
    res = estimate(
        r["log_p0"],
        r["log_p0"],
        r["length"],
        entropy_sum0=r["entropy_sum0"],
        entropy_sum1=r["entropy_sum0"],
        log_q=r["log_q"],
    )
    assert res.delta.value == res.delta.se == res.delta_rb.value == res.delta_tok.se == 0.0
    arrays = [
        tokens[k][0].reshape(-1, 4) for k in ("token_logp0", "token_logp0", "token_entropy0", "token_entropy0", "mask")
    ]
    for method in ("cv", "pd", "pd_sn"):
        tok = estimate_tokens(
            *arrays, np.repeat(np.arange(4), 32), method=method, token_logq=tokens["token_logq"][0].reshape(-1, 4)
        )
        assert tok.delta.value == tok.delta.se == tok.delta_tok.value == 0.0, method


# ---------------------------------------------------------------------------------------------
# against a naive loop: values, SEs, ΔH₁ and the p0/q diagnostics


def _naive_q(s0, s1, sq, L, group) -> dict:
    """Per prompt: v̄ ∝ p0/q, w̄ ∝ p1/q; H0, H1, ΔH, H0_tok with their fixed-mode SEs (ψ as in
    snis.estimate's Notes), ΔH₁ and the p0/q ESS / mean ratio / KL, written out one prompt at a time."""
    prompts = sorted(set(group.tolist()))
    per = {k: [] for k in ("h0", "h1", "a0", "b0", "cov", "ess", "ratio", "kl")}
    parts = []
    for p in prompts:
        m = group == p
        lv, lw = s0[m] - sq[m], s1[m] - sq[m]
        v, w = np.exp(lv - logsumexp(lv)), np.exp(lw - logsumexp(lw))
        per["h0"].append(np.sum(v * -s0[m]))
        per["h1"].append(np.sum(w * -s1[m]))
        per["a0"].append(np.sum(v * -s0[m]))
        per["b0"].append(np.sum(v * L[m]))
        x, y = s0[m] - np.sum(v * s0[m]), (s1[m] - s0[m]) - np.sum(v * (s1[m] - s0[m]))
        per["cov"].append(np.sum(v * x * y) / (1 - np.sum(v**2)))
        per["ess"].append(1 / np.sum(v**2))
        per["ratio"].append(np.mean(np.exp(lv)))
        per["kl"].append(np.sum(v * lv))
        parts.append((m, v, w))
    r0 = np.mean(per["a0"]) / np.mean(per["b0"])
    var = {"h0": 0.0, "h1": 0.0, "delta": 0.0, "h0_tok": 0.0}
    for (m, v, w), h0_p, h1_p, a0_p, b0_p in zip(parts, per["h0"], per["h1"], per["a0"], per["b0"]):
        n = m.sum()
        psi0, psi1 = n * v * (-s0[m] - h0_p), n * w * (-s1[m] - h1_p)
        psi_tok = n * v * ((-s0[m] - r0 * L[m]) - (a0_p - r0 * b0_p)) / np.mean(per["b0"])
        for k, psi in (("h0", psi0), ("h1", psi1), ("delta", psi1 - psi0), ("h0_tok", psi_tok)):
            var[k] += np.var(psi, ddof=1) / n
    P = len(prompts)
    return {
        "value": {"h0": np.mean(per["h0"]), "h1": np.mean(per["h1"]), "h0_tok": r0, "delta1": -np.mean(per["cov"])},
        "se": {k: np.sqrt(v_) / P for k, v_ in var.items()},
        "ess": P**2 / np.sum(1 / np.asarray(per["ess"])),
        "ratio": (min(per["ratio"]), max(per["ratio"])),
        "kl": np.mean(per["kl"]),
    }


def test_values_ses_and_p0q_diagnostics_match_a_naive_loop(rng):
    rows = random_rows(rng, [30, 45, 25, 40])  # ragged, shuffled, arbitrary labels
    log_q = rows["log_p0"] + rng.normal(0.0, 0.3, size=rows["log_p0"].size)
    log_q = np.minimum(log_q, 0.0)
    res = estimate(rows["log_p0"], rows["log_p1"], rows["length"], rows["group"], weights="none", log_q=log_q)
    ref = _naive_q(rows["log_p0"], rows["log_p1"], log_q, rows["length"], rows["group"])
    for k, v in ref["value"].items():
        assert getattr(res, k).value == pytest.approx(v, rel=1e-12), k
    for k, v in ref["se"].items():
        assert getattr(res, k).se == pytest.approx(v, rel=1e-10), k
    assert res.delta.value == pytest.approx(res.cov_term + res.kl_term, rel=1e-12)  # exact decomposition
    q = res.proposal
    assert q.ess == pytest.approx(ref["ess"], rel=1e-12) and q.kl == pytest.approx(ref["kl"], rel=1e-12)
    assert (q.mean_ratio_min, q.mean_ratio_max) == pytest.approx(ref["ratio"], rel=1e-12)
    json.dumps(res.to_dict(), allow_nan=False)
    assert "proposal q ≠ p0" in res.summary()


def test_weighted_covariance_with_uniform_weights_is_the_sample_covariance(rng):
    rows = random_rows(rng, [7, 12, 9], shuffle=False)
    g = make_groups(np.repeat(np.arange(3), [7, 12, 9]), np.arange(3))
    x, y = rows["log_p0"], rows["log_p1"] - rows["log_p0"]
    a, b = covariance(x, y, g), weighted_covariance(x, y, g.uniform, g)
    assert b.value == pytest.approx(a.value, rel=1e-12)
    np.testing.assert_allclose(b.psi, a.psi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.z, a.z, rtol=1e-12, atol=1e-12)


def test_per_prompt_estimates_slice_log_q():
    rows, _ = _samples(ALPHA_Q, ALPHA_1, 32, 1)
    flat = {k: rows[k][0].reshape(-1) for k in ("log_p0", "log_p1", "length", "log_q")}
    group = np.repeat(np.arange(4), 32)
    per = estimate_per_prompt(flat["log_p0"], flat["log_p1"], flat["length"], group, log_q=flat["log_q"])
    one = estimate(
        *(v[group == 2] for v in (flat["log_p0"], flat["log_p1"], flat["length"])), log_q=flat["log_q"][group == 2]
    )
    assert per[2].delta == one.delta and per[2].proposal == one.proposal


# ---------------------------------------------------------------------------------------------
# the sampler–scorer gap


def _naive_gap(lq, l0, mask, group, tol):
    d = [abs(lq[i, t] - l0[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    lam = np.array([sum(l0[i, t] - lq[i, t] for t in range(mask.shape[1]) if mask[i, t]) for i in range(mask.shape[0])])
    ess = []
    for p in sorted(set(group.tolist())):
        w = np.exp(lam[group == p] - logsumexp(lam[group == p]))
        ess.append(1.0 / np.sum(w**2))
    sizes = np.array([np.sum(group == p) for p in sorted(set(group.tolist()))])
    pooled = len(ess) ** 2 / np.sum(1.0 / np.asarray(ess))
    return np.mean(d), np.max(d), np.mean(np.asarray(d) > tol), pooled / len(group), np.asarray(ess) / sizes


def test_sampler_gap_matches_a_naive_loop(rng):
    n, c = 30, 9
    mask = np.arange(c)[None, :] < rng.integers(1, c + 1, size=(n, 1))  # right-padded rows
    l0 = np.where(mask, -rng.gamma(1.0, 1.0, size=(n, c)), np.nan)  # garbage where not counted
    lq = np.where(mask, np.minimum(l0 + rng.normal(0, 0.02, size=(n, c)), 0.0), -np.inf)
    group = rng.permutation(np.repeat([5, 2, 9], [8, 12, 10]))  # shuffled, ragged
    gap = sampler_gap(lq, l0, mask, group, tol=0.01)
    mean_abs, max_abs, frac, ess_frac, per = _naive_gap(lq, l0, mask, group, 0.01)
    assert gap.mean_abs == pytest.approx(mean_abs, rel=1e-12) and gap.max_abs == pytest.approx(max_abs, rel=1e-12)
    assert gap.frac_over == frac and gap.n_tokens == mask.sum()
    assert gap.ess_frac == pytest.approx(ess_frac, rel=1e-12)
    np.testing.assert_allclose(gap.ess_frac_prompt, per, rtol=1e-12)  # sorted ids 2, 5, 9
    assert gap.ess_frac_min == pytest.approx(per.min(), rel=1e-12)
    d = json.loads(json.dumps(gap.to_dict(), allow_nan=False))
    assert d["n_tokens"] == int(mask.sum()) and len(d["ess_frac_prompt"]) == 3


def test_sampler_gap_is_zero_for_q_equal_p0_and_warns_when_large():
    _, tokens = _samples(ALPHA_Q, ALPHA_1, 64, 1)
    l0, lq = (tokens[k][0].reshape(-1, 4) for k in ("token_logp0", "token_logq"))
    mask, group = tokens["mask"][0].reshape(-1, 4), np.repeat(np.arange(4), 64)
    same = sampler_gap(l0, l0, mask, group)
    assert same.mean_abs == same.max_abs == same.frac_over == 0.0 and same.ess_frac == pytest.approx(1.0, rel=1e-12)
    assert same.warning is None and same.to_dict()["warning"] is None
    far = sampler_gap(lq, l0, mask, group)
    assert far.mean_abs > 0.01 and far.ess_frac < 1.0 and far.frac_over > 0.5
    # the same p0/q sequence weights as estimate's (token sums = sequence totals, up to rounding)
    rows, _ = _samples(ALPHA_Q, ALPHA_1, 64, 1)
    res = estimate(*(rows[k][0] for k in ("log_p0", "log_p1", "length")), weights="none", log_q=rows["log_q"][0])
    assert far.ess == pytest.approx(res.proposal.ess, rel=1e-9)
    assert far.ess_frac_min == pytest.approx(res.proposal.ess_frac_min, rel=1e-9)
    assert "\n" not in far.warning and "sampler–scorer gap" in far.warning
    empty = sampler_gap(l0, l0, np.zeros_like(mask), group)  # nothing counted: nan → None in JSON
    assert json.loads(json.dumps(empty.to_dict(), allow_nan=False))["mean_abs"] is None
    assert isinstance(far, SamplerGap)
    # a gap the per-token mean hides but the sequence weights show: warns on ESS/S alone
    tilt = np.where(np.arange(64 * 4) % 8 == 0, -2.0, 0.0)[:, None] * (np.arange(4) == 0)  # row-wise offsets
    sparse = sampler_gap(np.minimum(l0 + tilt, 0.0), l0, mask, group, tol=10.0)
    assert sparse.frac_over == 0.0 and sparse.ess_frac < GAP_ESS and sparse.warning is not None


# ---------------------------------------------------------------------------------------------
# bad input: a ValueError naming the argument


def _with(x: np.ndarray, index, value) -> np.ndarray:
    out = np.array(x, dtype=float)
    out[index] = value
    return out


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda q: q[:-1], r"log_q: expected shape \(64,\).*got \(63,\)"),
        (lambda q: _with(q, 3, np.nan), r"log_q: expected finite.*\(nan\) at rows \[3\]"),
        (
            lambda q: _with(q, 5, -np.inf),
            r"log_q: expected finite.*\(-inf\) at rows \[5\].*drawn from q, so q\(x\) > 0",
        ),
        (lambda q: -q + 1.0, r"log_q: expected log-probabilities \(≤ 0\)"),
        (lambda q: "abc", r"log_q: expected a numeric array"),
    ],
    ids=["shape", "nan", "-inf where p0 > 0", "positive", "not numeric"],
)
def test_bad_log_q_raises_naming_it(bad, match):
    rows, _ = _samples(ALPHA_Q, ALPHA_1, 16, 1)
    flat = {k: rows[k][0].reshape(-1) for k in ("log_p0", "log_p1", "length", "log_q")}
    group = np.repeat(np.arange(4), 16)
    with pytest.raises(ValueError, match=match):
        estimate(flat["log_p0"], flat["log_p1"], flat["length"], group, log_q=bad(flat["log_q"]))


@pytest.mark.parametrize("where", ["estimate_tokens", "sampler_gap"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda q, m: q[:, :-1], r"token_logq: expected a 2-D array of shape \(64, 4\)"),
        (lambda q, m: _with(q, (2, 0), -np.inf), r"token_logq: expected finite.*\(2, 0\).*q drew every counted"),
        (lambda q, m: _with(q, (1, 0), np.nan), r"token_logq: expected finite.*\(1, 0\)"),
        (lambda q, m: np.where(m, 0.5, q), r"token_logq: expected log-probabilities \(≤ 0\)"),
    ],
    ids=["shape", "-inf where p0 > 0", "nan", "positive"],
)
def test_bad_token_logq_raises_naming_it(where, bad, match):
    _, tokens = _samples(ALPHA_Q, ALPHA_1, 16, 1)
    arrays = [tokens[k][0].reshape(-1, 4) for k in TOKEN_KEYS]
    logq, mask = tokens["token_logq"][0].reshape(-1, 4), arrays[4]
    group = np.repeat(np.arange(4), 16)
    with pytest.raises(ValueError, match=match):
        if where == "sampler_gap":
            sampler_gap(bad(logq, mask), arrays[0], mask, group)
        else:
            estimate_tokens(*arrays, group, token_logq=bad(logq, mask))


def test_non_counted_positions_of_token_logq_are_not_read():
    _, tokens = _samples(ALPHA_Q, ALPHA_1, 16, 1)
    arrays = [tokens[k][0].reshape(-1, 4) for k in TOKEN_KEYS]
    logq, mask = tokens["token_logq"][0].reshape(-1, 4), arrays[4]
    group = np.repeat(np.arange(4), 16)
    a = estimate_tokens(*arrays, group, token_logq=logq)
    b = estimate_tokens(*arrays, group, token_logq=np.where(mask, logq, -np.inf))  # q's pads: -inf
    assert a.delta == b.delta and sampler_gap(np.where(mask, logq, np.nan), arrays[0], mask, group) == sampler_gap(
        logq, arrays[0], mask, group
    )


@pytest.mark.parametrize("tol", [-0.1, float("nan"), "0.01"])
def test_sampler_gap_rejects_a_bad_tolerance(tol):
    _, tokens = _samples(ALPHA_Q, ALPHA_1, 16, 1)
    l0, mask = tokens["token_logp0"][0].reshape(-1, 4), tokens["mask"][0].reshape(-1, 4)
    with pytest.raises(ValueError, match="tol: expected"):
        sampler_gap(l0, l0, mask, np.repeat(np.arange(4), 16), tol=tol)


# ---------------------------------------------------------------------------------------------
# the headline policy: p0/q's ESS is a precondition like the others


def _step(alpha_q: float, alpha1: float = 0.1, g: int = 64):
    rows, tokens = _samples(alpha_q, alpha1, g, 1)
    snis = _one(rows, tokens, 0, "snis_rb")
    return snis, _one(rows, tokens, 0, "cv"), _one(rows, tokens, 0, "pd_sn")


def test_headline_reads_a_step_from_a_near_proposal_and_says_why():
    snis, cv, sn = _step(-0.05)
    h = headline(snis, cv, sn, support_size=4)
    # cv, or pd_sn where the tail of cv's per-row terms is too heavy (issue 26's check)
    assert h.valid and h.method in ("cv", "pd_sn")
    assert "ESS / S of p0/q (pooled)" in h.why and "mean ratio p1/q" in h.why
    assert any(c.name == "prefix ESS / G of p0/q (smallest)" and c.passed for c in h.checks[h.method])


def test_headline_refuses_a_step_whose_proposal_is_far_from_p0():
    """q with logits tilted by −2.5·Δ: the p0/q weights leave a few rows per prompt, so no method's
    preconditions hold, though nothing else about the step (a small p1 − p0) is wrong."""
    snis, cv, sn = _step(-2.5)
    assert snis.proposal.ess_frac < 0.5
    h = headline(snis, cv, sn, support_size=4)
    assert not h.valid and "ESS / S of p0/q (pooled)" in h.reason
    assert any("proposal weights p0/q" in w for w in snis.warnings)
