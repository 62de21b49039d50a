"""Closed forms: p1 = p0, a constant shift of log p1, and P copies of one prompt."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import random_rows

from isdelta.estimators import estimate

ESTIMATES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok")


@pytest.mark.parametrize("weights", ["none", "psis", "truncate", "clip"])
@pytest.mark.parametrize("sizes", [[30] * 4, [2, 5, 9, 40]], ids=["per_prompt", "ragged"])
def test_identical_models_give_zero_delta_exactly(rng, weights, sizes):
    rows = random_rows(rng, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # p1 = p0 must not trigger any diagnostic warning
        res = estimate(
            rows["log_p0"],
            rows["log_p0"].copy(),
            rows["length"],
            rows["group"],
            entropy_sum0=rows["entropy_sum0"],
            entropy_sum1=rows["entropy_sum0"].copy(),
            weights=weights,
            clip=2.0 if weights == "clip" else None,
        )
    for name in ("delta", "delta_tok", "delta_rb", "delta_tok_rb", "delta1"):
        est = getattr(res, name)
        assert est.value == 0.0, name  # exactly, not approximately
        assert est.se == 0.0, name
    assert res.h1.value == res.h0.value
    n, n_prompts = len(rows["log_p0"]), len(sizes)
    # uniform weights: ESS_p = G_p; pooled ESS = P² / Σ 1/G_p (= N when G is equal)
    assert res.ess == pytest.approx(n_prompts**2 / np.sum(1.0 / np.asarray(sizes)), rel=1e-12)
    if len(set(sizes)) == 1:
        assert res.ess == pytest.approx(n, rel=1e-12)
        assert res.ess_frac == pytest.approx(1.0, rel=1e-12)
    assert res.ess_min == pytest.approx(min(sizes), rel=1e-12)
    assert res.kl == 0.0 and res.cov_term == 0.0 and res.kl_term == 0.0
    assert res.mean_ratio_min == res.mean_ratio_max == 1.0
    assert math.isnan(res.khat) and res.khat_status == "not estimable"
    assert res.warnings == ()


@pytest.mark.parametrize("weights", ["none", "psis", "truncate"])
def test_constant_shift_of_log_p1_changes_nothing_after_normalisation(rng, weights):
    rows = random_rows(rng, [40, 30, 55])
    shift = -3.7  # negative keeps log_p1 ≤ 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (rows["log_p0"],)
        kw = {"length": rows["length"], "group": rows["group"], "weights": weights}
        base = estimate(*args, rows["log_p1"], **kw)
        moved = estimate(*args, rows["log_p1"] + shift, **kw)
    # H1 uses S1 itself, which the shift moves by −shift: compare through ΔH's weights only
    assert moved.h0.value == base.h0.value
    assert moved.h1.value == pytest.approx(base.h1.value - shift, rel=1e-12)
    assert moved.delta.value == pytest.approx(base.delta.value - shift, rel=1e-12)
    assert moved.delta.se == pytest.approx(base.delta.se, rel=1e-9)
    for name in ("ess", "ess_min", "ess_mean"):
        assert getattr(moved, name) == pytest.approx(getattr(base, name), rel=1e-10), name
    assert moved.khat == pytest.approx(base.khat, rel=1e-8)
    assert moved.kl == pytest.approx(base.kl + shift, rel=1e-12)
    assert moved.mean_ratio_max == pytest.approx(base.mean_ratio_max * math.exp(shift), rel=1e-12)


@pytest.mark.parametrize("weights", ["none", "psis", "truncate"])
def test_shifted_log_ratio_with_unchanged_scores_is_invariant(rng, weights):
    """log_p1 + c scales every r by e^c, so the self-normalised weights do not change.

    Estimates that use the weights but not S1 itself (the Rao–Blackwellised ones, which score
    with the entropy sums) must therefore be unchanged, SEs included.
    """
    rows = random_rows(rng, [40, 30, 55])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def run(log_p1):
            return estimate(
                rows["log_p0"],
                log_p1,
                rows["length"],
                rows["group"],
                entropy_sum0=rows["entropy_sum0"],
                entropy_sum1=rows["entropy_sum1"],
                weights=weights,
            )

        base, moved = run(rows["log_p1"]), run(rows["log_p1"] - 2.5)
    for name in ESTIMATES:
        a, b = getattr(base, name + "_rb"), getattr(moved, name + "_rb")
        assert b.value == pytest.approx(a.value, rel=1e-12, abs=1e-14), name
        assert b.se == pytest.approx(a.se, rel=1e-9, abs=1e-14), name


@pytest.mark.parametrize("weights", ["none", "clip"])
def test_copies_of_one_prompt_equal_one_prompt_with_all_rows(rng, weights):
    """P identical prompts (same G rows each) vs one prompt holding the P·G rows."""
    g, n_prompts = 50, 6
    one = random_rows(rng, [g], shuffle=False, labels=[0])
    tiled = {k: np.tile(v, n_prompts) for k, v in one.items()}
    kw = {"weights": weights, "clip": 1.3 if weights == "clip" else None, "prompts": "fixed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        many = estimate(
            tiled["log_p0"], tiled["log_p1"], tiled["length"],
            np.repeat(np.arange(n_prompts), g), **kw,
        )  # fmt: skip
        single = estimate(tiled["log_p0"], tiled["log_p1"], tiled["length"], None, **kw)
    for name in ESTIMATES:
        a, b = getattr(many, name), getattr(single, name)
        assert b.value == pytest.approx(a.value, rel=1e-12, abs=1e-13), name
        # same data, so the SEs agree up to ddof: (G − 1) vs (P·G − 1) denominators
        assert b.se == pytest.approx(a.se, rel=0.02), name
    # ΔH₁ uses the unbiased (ddof = 1) covariance: the copies differ by exactly that factor
    ddof_ratio = n_prompts * (g - 1) / (n_prompts * g - 1)
    assert single.delta1.value == pytest.approx(many.delta1.value * ddof_ratio, rel=1e-12)
    assert single.kl == pytest.approx(many.kl, rel=1e-12, abs=1e-14)
