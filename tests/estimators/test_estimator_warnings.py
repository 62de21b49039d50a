"""Diagnostic warnings: issued with a hint (EstimatorWarning, at the caller) and recorded."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from isdelta.estimators import EstimatorWarning, estimate
from isdelta.estimators.diagnostics import KHAT_ESS_GATE


def _scores(rng, p: int, g: int, step: float, tail_k: float | None = None):
    """[P, G] scores; log r ~ normal(0, ``step``) or, with ``tail_k``, generalised-Pareto."""
    length = rng.integers(5, 40, size=(p, g)).astype(float)
    log_p0 = -rng.gamma(3.0, 1.0, size=(p, g)) * length / 3
    if tail_k is None:
        log_r = rng.normal(0.0, step, size=(p, g))
    else:
        u = rng.random((p, g))
        log_r = np.log1p((u ** (-tail_k) - 1.0) / tail_k) - 1.0
    log_p1 = np.minimum(log_p0 + log_r, 0.0)
    return log_p0, log_p1, length


def _estimate_recording(*args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate(*args, **kw)
    ours = [w for w in caught if issubclass(w.category, EstimatorWarning)]
    return res, ours


def test_benign_update_warns_nothing(rng):
    res, caught = _estimate_recording(*_scores(rng, 8, 100, step=0.1))
    assert caught == [] and res.warnings == ()
    assert res.khat_status == "good"


def test_heavy_tail_warns_about_khat_with_hint_at_the_caller(rng):
    res, caught = _estimate_recording(*_scores(rng, 4, 200, step=0.0, tail_k=0.9))
    assert res.khat > res.khat_threshold
    assert any("k̂ = " in w for w in res.warnings)
    message = next(w for w in res.warnings if "k̂ = " in w)
    assert "S_min" in message or "very bad" in message
    assert "Fix:" in message
    # issued once per recorded message, pointing at this file (stacklevel=2)
    assert [str(w.message) for w in caught] == list(res.warnings)
    assert all(w.filename == __file__ for w in caught)


def test_khat_above_one_is_very_bad(rng):
    res, _ = _estimate_recording(*_scores(rng, 2, 400, step=0.0, tail_k=2.0))
    assert res.khat > 1.0 and res.khat_status == "very bad"
    assert math.isinf(res.s_min)
    assert any("very bad" in w for w in res.warnings)


def test_low_ess_warns(rng):
    res, _ = _estimate_recording(*_scores(rng, 4, 50, step=3.0), weights="none")
    assert res.ess_frac < 0.1
    assert any(w.startswith("ESS/S") for w in res.warnings)


def test_fewer_samples_than_exp_kl_warns(rng):
    res, _ = _estimate_recording(*_scores(rng, 4, 30, step=3.0), weights="none")
    assert res.kl > math.log(30)
    assert any(w.startswith("S < exp(KL)") for w in res.warnings)


def test_mean_ratio_far_from_one_warns_about_missed_mass(rng):
    log_p0, log_p1, length = _scores(rng, 4, 50, step=0.1)
    log_p1[0] -= 2.0  # prompt 0: p1 misses e^-2 of the mass p0 samples see
    res, _ = _estimate_recording(log_p0, log_p1, length)
    assert res.mean_ratio_min < 0.5
    message = next(w for w in res.warnings if w.startswith("mean ratio"))
    assert "1 of 4 prompts" in message and "support" in message


def test_empty_rows_warn(rng):
    log_p0, log_p1, length = _scores(rng, 3, 30, step=0.1)
    length[1, :3] = 0
    log_p0[1, :3] = log_p1[1, :3] = 0.0  # nothing counted: S = 0 too
    res, _ = _estimate_recording(log_p0, log_p1, length)
    assert res.n_empty == 3
    assert any("have L = 0" in w for w in res.warnings)


def test_khat_not_estimable_is_reported_not_called_good(rng):
    log_p0, log_p1, length = _scores(rng, 2, 6, step=0.3)  # 12 rows: no tail fit possible
    res, _ = _estimate_recording(log_p0, log_p1, length, weights="psis")
    assert math.isnan(res.khat) and math.isnan(res.s_min)
    assert res.khat_status == "not estimable"
    assert any(w.startswith("k̂ not estimable") for w in res.warnings)
    assert "not estimable" in res.summary()


def test_warnings_can_be_silenced_and_are_still_recorded(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # would raise if issued...
        warnings.simplefilter("ignore", EstimatorWarning)  # ...unless filtered by category
        res = estimate(*_scores(rng, 4, 50, step=3.0), weights="none")
    assert len(res.warnings) >= 2


@pytest.mark.parametrize("weights", ["none", "psis"])
def test_non_finite_inputs_raise_instead_of_warning(rng, weights):
    log_p0, log_p1, length = _scores(rng, 2, 30, step=0.1)
    log_p1[0, 0] = -np.inf
    with pytest.raises(ValueError, match="log_p1"):
        estimate(log_p0, log_p1, length, weights=weights)


def test_a_high_khat_with_a_healthy_ess_is_reported_but_not_a_warning(rng):
    """A heavy-tailed SHAPE of tiny log-ratios (a 1e-4-lr step): k̂ is above its threshold but
    the weights are all ≈ 1 (ESS/S 0.99). The threshold alone cried wolf on healthy real steps
    (18–64% of sets); the status says so and nothing warns. A heavy tail with a low ESS still
    warns, and the warning says what the threshold means."""
    log_p0, _, length = _scores(rng, 1, 64, step=0.0)
    u = ((np.arange(64) + 0.5) / 64)[None]  # GPD(k=1.2) quantiles: a heavy shape, tiny size
    log_r = 1e-4 * (u ** (-1.2) - 1.0) / 1.2
    res, caught = _estimate_recording(log_p0, log_p0 + log_r, length)
    assert res.khat_threshold < res.khat < 1.0 and res.ess_frac > 0.99
    assert res.khat_status == "high, ESS fine" and caught == [] and res.warnings == ()
    heavy, _ = _estimate_recording(*_scores(rng, 4, 200, step=0.0, tail_k=0.9))
    assert heavy.ess_frac < KHAT_ESS_GATE and heavy.khat_status in ("bad", "very bad")
    message = next(w for w in heavy.warnings if "k̂ = " in w)
    assert "very bad" in message or ("still gives a reliable estimate" in message and "ESS/S" in message)
