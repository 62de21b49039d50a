"""``estimate`` against a naive per-prompt loop (naive.py) and the exact decomposition identity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import random_rows
from naive import naive

from isdelta.estimators import estimate

ESTIMATES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok", "delta1")
SIZES = {
    "ragged_small": [2, 3, 7, 30, 5, 11],  # some G < 25: k̂ pooled
    "ragged_large": [25, 40, 31, 60],  # every G ≥ 25: per prompt
}


def _run(rows: dict, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diagnostics are tested in test_estimator_warnings
        return estimate(
            rows["log_p0"],
            rows["log_p1"],
            rows["length"],
            rows["group"],
            entropy_sum0=rows["entropy_sum0"],
            entropy_sum1=rows["entropy_sum1"],
            **kw,
        )


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_values_and_fixed_se_match_naive_loop(rng, sizes):
    rows = random_rows(rng, sizes)
    res = _run(rows, weights="none", prompts="fixed")
    ref = naive(rows["log_p0"], rows["log_p1"], rows["length"], rows["group"])
    for name in ESTIMATES:
        est = getattr(res, name)
        assert est.value == pytest.approx(ref[name], rel=1e-10, abs=1e-12), name
        assert est.se == pytest.approx(ref["se_fixed"][name], rel=1e-9), name
    for name in ("kl", "cov_term", "kl_term", "ess", "ess_min"):
        assert getattr(res, name) == pytest.approx(ref[name], rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_sampled_se_matches_between_prompt_sd(rng, sizes):
    rows = random_rows(rng, sizes)
    res = _run(rows, weights="none", prompts="sampled")
    ref = naive(rows["log_p0"], rows["log_p1"], rows["length"], rows["group"])
    for name in ("delta", "h0", "delta_tok", "delta1"):
        assert getattr(res, name).se == pytest.approx(ref["se_sampled"][name], rel=1e-9), name
    # values do not depend on the SE mode
    fixed = _run(rows, weights="none", prompts="fixed")
    assert res.delta.value == fixed.delta.value


def test_rao_blackwell_values_match_naive(rng):
    rows = random_rows(rng, [4, 9, 30])
    res = _run(rows, weights="none")
    g, s0, s1 = rows["group"], rows["log_p0"], rows["log_p1"]
    e0, e1, L = rows["entropy_sum0"], rows["entropy_sum1"], rows["length"]
    h0, h1, a0, b0, a1, b1 = [], [], 0.0, 0.0, 0.0, 0.0
    for p in np.unique(g):
        m = g == p
        w = np.exp(s1[m] - s0[m])
        w /= w.sum()
        h0.append(e0[m].mean())
        h1.append(np.sum(w * e1[m]))
        a0, b0 = a0 + e0[m].mean(), b0 + L[m].mean()
        a1, b1 = a1 + np.sum(w * e1[m]), b1 + np.sum(w * L[m])
    assert res.h0_rb.value == pytest.approx(np.mean(h0), rel=1e-12)
    assert res.h1_rb.value == pytest.approx(np.mean(h1), rel=1e-12)
    assert res.delta_rb.value == pytest.approx(np.mean(h1) - np.mean(h0), rel=1e-10)
    assert res.h0_tok_rb.value == pytest.approx(a0 / b0, rel=1e-12)
    assert res.delta_tok_rb.value == pytest.approx(a1 / b1 - a0 / b0, rel=1e-10)


@pytest.mark.parametrize("weights", ["none", "psis", "truncate", "clip"])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_decomposition_identity_exact(rng, weights, sizes):
    """ΔĤ = −mean((r̃ − 1)(S0 − S̄0)) − Σ w̄ δ per prompt, to 1e-10, for the weights used.

    The identity is algebraic for any weights normalised within prompts, so it must hold for
    smoothed weights too, as long as H1 and both terms use the same weights.
    """
    rows = random_rows(rng, sizes, step=0.8)
    res = _run(rows, weights=weights, clip=1.5 if weights == "clip" else None)
    assert res.delta.value == pytest.approx(res.cov_term + res.kl_term, abs=1e-10)
    assert res.delta.value == pytest.approx(res.h1.value - res.h0.value, abs=1e-10)
    if weights == "none":
        # against ΔĤ computed from its definition (H1 − H0) in the naive loop
        ref = naive(rows["log_p0"], rows["log_p1"], rows["length"], rows["group"])
        assert ref["delta"] == pytest.approx(res.cov_term + res.kl_term, abs=1e-10)
        assert res.kl_term == pytest.approx(-res.kl, abs=1e-12)


def test_two_d_layout_equals_one_d_with_group(rng):
    rows = random_rows(rng, [40] * 5, shuffle=False, labels=list(range(5)))
    flat = _run(rows, weights="psis")
    as_2d = {k: v.reshape(5, 40) for k, v in rows.items() if k != "group"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = estimate(
            as_2d["log_p0"],
            as_2d["log_p1"],
            as_2d["length"],
            entropy_sum0=as_2d["entropy_sum0"],
            entropy_sum1=as_2d["entropy_sum1"],
        )
    assert grid.to_dict() == flat.to_dict()


def test_row_order_and_labels_do_not_matter(rng):
    rows = random_rows(rng, [26, 30, 44], shuffle=False, labels=[7, 3, 5])
    base = _run(rows, weights="psis")
    perm = rng.permutation(rows["log_p0"].shape[0])
    shuffled = {k: v[perm] for k, v in rows.items()}
    shuffled["group"] = np.array([f"prompt-{g}" for g in shuffled["group"]])  # string ids
    other = _run(shuffled, weights="psis")
    for name in ESTIMATES:
        a, b = getattr(base, name), getattr(other, name)
        assert b.value == pytest.approx(a.value, rel=1e-12, abs=1e-13), name
        assert b.se == pytest.approx(a.se, rel=1e-10), name
    assert other.khat == pytest.approx(base.khat, rel=1e-12)
    assert other.ess == pytest.approx(base.ess, rel=1e-12)
