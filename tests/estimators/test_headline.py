"""The headline policy: never an impossible number, never a valid-looking one when the sample
cannot support it. Cases built on the enumerable toy (so the truth is known) and by moving one
estimate past a physical bound."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest

from isdelta.estimators import METHOD_CODES, Estimate, estimate, estimate_tokens, headline
from isdelta.estimators import policy as headline_mod

pytestmark = pytest.mark.filterwarnings("ignore::isdelta.estimators.EstimatorWarning")


def step(toy, alpha: float, G: int, seed: int = 3):
    """``estimate`` and the cv / pd_sn ``estimate_tokens`` of one sample set of G per prompt."""
    ids = toy.sample(np.random.default_rng(seed), 0.0, 1, G)  # [1, P, G]
    r = {k: v[0].reshape(-1) for k, v in toy.rows(ids, 0.0, alpha).items()}
    t = {k: v[0].reshape(-1, v.shape[-1]) for k, v in toy.token_rows(ids, 0.0, alpha).items()}
    group = np.repeat(np.arange(toy.n_prompts), G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snis = estimate(
            r["log_p0"], r["log_p1"], r["length"], group, entropy_sum0=r["entropy_sum0"], entropy_sum1=r["entropy_sum1"]
        )
        arrays = (t["token_logp0"], t["token_logp1"], t["token_entropy0"], t["token_entropy1"], t["mask"], group)
        return snis, estimate_tokens(*arrays, method="cv"), estimate_tokens(*arrays, method="pd_sn")


def test_a_small_step_is_read_by_cv_with_its_reasons(toy):
    snis, cv, sn = step(toy, 0.1, 32)
    h = headline(snis, cv, sn, support_size=4)
    assert h.valid and h.method == "cv" and h.delta == cv.delta and h.h1_tok == cv.h1_tok
    assert "prefix ESS / G" in h.why and h.reason is None and h.code == METHOD_CODES["cv"]
    truth = toy.enumerate(0.1).exact()["h"] - toy.enumerate(0.0).exact()["h"]
    assert h.delta.ci_low <= truth <= h.delta.ci_high
    json.dumps(h.to_dict(), allow_nan=False)


def test_identical_models_give_zero_by_the_first_method(toy):
    snis, cv, sn = step(toy, 0.0, 8)
    h = headline(snis, cv, sn)
    assert h.valid and h.method == "cv" and h.delta.value == 0.0 and h.delta.se == 0.0


def test_an_impossible_cv_value_falls_back_to_a_bounded_method(toy):
    """cv is unbounded: an H1 below zero (as logged in the field, −535 nats) is never reported."""
    snis, cv, sn = step(toy, 0.1, 32)
    bad = dataclasses.replace(
        cv, h1=Estimate.normal(-5.0, 1.0, 0.95, 1.96), delta=Estimate.normal(-8.0, 1.0, 0.95, 1.96)
    )
    h = headline(snis, bad, sn)
    assert h.valid and h.method == "pd_sn" and h.delta == sn.delta
    assert not all(c.passed for c in h.checks["cv"]) and any("H(p1) per sequence" == c.name for c in h.checks["cv"])


def test_a_per_token_entropy_above_log_support_is_impossible(toy):
    snis, cv, sn = step(toy, 0.1, 32)
    too_high = Estimate.normal(math.log(4) + 0.1, 0.01, 0.95, 1.96)
    h = headline(
        snis, dataclasses.replace(cv, h1_tok=too_high), dataclasses.replace(sn, h1_tok=too_high), support_size=4
    )
    assert h.method == "snis_rb"  # RB SNIS: a weighted mean of entropies, within the bound by construction
    assert headline(snis, dataclasses.replace(cv, h1_tok=too_high)).method == "cv"  # no support size: no bound


def test_p1_mass_that_no_sample_reached_invalidates_every_method(toy):
    """Mean ratio p1/p0 far below 1: every estimate, the bounded ones too, would be confidently
    wrong; the result says so and what would help."""
    snis, cv, sn = step(toy, 0.1, 32)
    far = dataclasses.replace(snis, mean_ratio_min=1e-3)
    h = headline(far, cv, sn)
    assert not h.valid and h.method == "none" and h.delta is None and h.code == 0
    assert "mean ratio p1/p0" in h.reason and "samples per prompt" in h.advice and "smaller" in h.advice
    assert str(h).startswith("ΔH not valid")


def test_khat_above_one_rules_everything_out_unless_the_ess_says_it_is_a_noisy_fit(toy):
    """k̂ > 1 with a low ESS: no method. With ESS/S ≥ 0.5 (weights spread evenly) a k̂ > 1 came
    from noisy tail fits on healthy real steps (benchmarks/README.md): it does not veto."""
    snis, cv, sn = step(toy, 0.1, 32)
    h = headline(dataclasses.replace(snis, khat=1.4, ess_frac=0.3), cv, sn)
    assert not h.valid and h.reason.startswith("k̂ = 1.40 > 1 with ESS/S 0.30")
    assert snis.ess_frac >= 0.5 and headline(dataclasses.replace(snis, khat=1.4), cv, sn).valid


def test_a_large_step_with_few_samples_is_not_valid_and_the_advice_scales(toy):
    snis, cv, sn = step(toy, 3.0, 4)
    h = headline(snis, cv, sn)
    assert not h.valid
    need = float(h.advice.split("about ")[1].split(" samples")[0])
    assert need > 4 and h.advice.count("×") == 1


def test_without_per_decision_results_snis_is_the_headline(toy):
    snis, _, _ = step(toy, 0.1, 32)
    h = headline(snis)
    assert h.valid and h.method == "snis_rb" and h.delta == snis.delta_rb
    plain = dataclasses.replace(
        snis, **{f"{k}_rb": None for k in ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok")}
    )
    assert headline(plain).method == "snis" and headline(plain).delta == snis.delta


def test_thresholds_are_module_constants_the_checks_quote(toy):
    snis, cv, sn = step(toy, 0.1, 32)
    h = headline(snis, cv, sn)
    ess = next(c for c in h.checks["cv"] if c.name.startswith("prefix ESS"))
    assert ess.threshold == headline_mod.CV_PREFIX_ESS and ess.op == "≥"
    assert next(c for c in h.checks["pd_sn"] if c.name.startswith("prefix ESS")).threshold == headline_mod.SN_PREFIX_ESS
