"""Weights: PSIS sign and k̂ against arviz itself, batching, truncation, clipping, ESS, k̂ rules."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from isdelta.estimators import psis, weights
from isdelta.estimators.groups import make_groups


def _arviz_reference(log_r: np.ndarray) -> tuple[np.ndarray, float]:
    """PSIS straight from the installed arviz, in its own convention (the external reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import arviz

            major = int(arviz.__version__.split(".")[0])
        except ImportError:  # arviz-stats alone is enough for isdelta
            major = None
        if major is not None and major < 1:
            log_w, khat = arviz.psislw(log_r.copy())
        else:  # arviz ≥ 1.0: input is a log-likelihood, weights ∝ exp(−input)
            from arviz_stats.base.array import array_stats

            log_w, khat = array_stats.psislw(-log_r, r_eff=1)
    return np.asarray(log_w), float(khat)


def _pareto_log_ratios(rng, n: int, k: float) -> np.ndarray:
    """log r with r − 1 ~ generalised Pareto of shape k (heavy right tail for k > 0)."""
    u = rng.random(n)
    return np.log1p((u ** (-k) - 1.0) / k)


def test_smoothed_weights_rise_with_raw_weights(rng):
    log_r = _pareto_log_ratios(rng, 400, k=0.8)
    res = weights.importance_weights(log_r, scheme="psis")
    order = np.argsort(log_r)
    assert np.all(np.diff(res.log_w[order]) >= -1e-12)
    # smoothing pulls the largest weight down, never up
    raw_max = np.max(log_r - np.logaddexp.reduce(log_r))
    assert res.log_w.max() <= raw_max + 1e-12


def test_khat_sees_a_heavy_right_tail_and_not_a_light_one(rng):
    """With the sign flipped, the heavy right tail of r would read as light (k̂ ≤ 0)."""
    heavy = weights.importance_weights(_pareto_log_ratios(rng, 4000, k=0.8), scheme="psis")
    light = weights.importance_weights(rng.normal(0.0, 0.1, 4000), scheme="psis")
    assert 0.6 < heavy.khat[0] < 1.0
    assert light.khat[0] < 0.3


def test_psis_matches_installed_arviz_on_heavy_tail(rng):
    log_r = _pareto_log_ratios(rng, 1000, k=0.7)
    ref_log_w, ref_khat = _arviz_reference(log_r)
    res = weights.importance_weights(log_r, scheme="psis")
    assert res.khat[0] == pytest.approx(ref_khat, rel=1e-12)
    # same weights after normalisation (arviz normalises over the sample too)
    np.testing.assert_allclose(res.log_w, ref_log_w - np.logaddexp.reduce(ref_log_w), atol=1e-12)


def test_batched_per_prompt_psis_equals_one_call_per_prompt(rng):
    """Prompts grouped by size and sent to arviz as [n, G] batches == one arviz call each."""
    sizes = [30, 45, 30, 60, 45, 30]
    group = np.repeat(np.arange(len(sizes)), sizes)
    log_r = np.concatenate([_pareto_log_ratios(rng, s, k=0.5) for s in sizes])
    perm = rng.permutation(log_r.size)
    res = weights.importance_weights(log_r[perm], group[perm], scheme="psis")
    assert res.per_prompt and res.khat.shape == (len(sizes),)
    log_w = np.empty_like(log_r)
    log_w[perm] = res.log_w
    for p in range(len(sizes)):
        m = group == p
        ref_log_w, ref_khat = _arviz_reference(log_r[m])
        assert res.khat[p] == pytest.approx(ref_khat, rel=1e-12)
        np.testing.assert_allclose(log_w[m], ref_log_w - np.logaddexp.reduce(ref_log_w), atol=1e-12)


def test_small_prompts_fall_back_to_one_pooled_fit(rng):
    sizes = [10, 40, 12]
    group = np.repeat([5, 6, 7], sizes)
    log_r = _pareto_log_ratios(rng, sum(sizes), k=0.5)
    res = weights.importance_weights(log_r, group, scheme="psis")
    assert not res.per_prompt
    assert res.khat.shape == (1,) and res.fit_sizes.tolist() == [sum(sizes)]
    assert "pooled" in res.description
    ref_log_w, ref_khat = _arviz_reference(log_r)
    assert res.khat[0] == pytest.approx(ref_khat, rel=1e-12)
    # smoothing pooled, normalisation per prompt: within a prompt, the smoothed ratios agree
    for p in (5, 6, 7):
        m = group == p
        expected = ref_log_w[m] - np.logaddexp.reduce(ref_log_w[m])
        np.testing.assert_allclose(res.log_w[m], expected, atol=1e-12)
        assert np.exp(res.log_w[m]).sum() == pytest.approx(1.0, rel=1e-12)


def test_too_few_rows_for_any_tail_fit_gives_nan_khat_and_raw_weights(rng):
    log_r = rng.normal(size=12)
    res = weights.importance_weights(log_r, np.repeat([0, 1], 6), scheme="psis")
    assert np.isnan(res.khat).all()
    assert "NOT applied" in res.description
    raw = weights.importance_weights(log_r, np.repeat([0, 1], 6), scheme="none")
    np.testing.assert_array_equal(res.log_w, raw.log_w)


def test_truncation_caps_ratio_at_mean_times_sqrt_s(rng):
    sizes = [40, 60]
    group = np.repeat([0, 1], sizes)
    log_r = rng.normal(0.0, 1.0, size=100)
    log_r[[3, 70]] = 6.0  # one outlier per prompt, r ≈ 400 > mean(r)·√G
    res = weights.importance_weights(log_r, group, scheme="truncate")
    for p, g in enumerate(sizes):
        m = group == p
        r = np.exp(log_r[m])
        capped = np.minimum(r, r.mean() * math.sqrt(g))
        assert (r > r.mean() * math.sqrt(g)).any()  # the cap binds in this sample
        np.testing.assert_allclose(np.exp(res.log_w[m]), capped / capped.sum(), rtol=1e-12)


def test_clip_caps_raw_ratio(rng):
    log_r = rng.normal(0.0, 1.0, size=50)
    res = weights.importance_weights(log_r, scheme="clip", clip=1.5)
    capped = np.minimum(np.exp(log_r), 1.5)
    np.testing.assert_allclose(np.exp(res.log_w), capped / capped.sum(), rtol=1e-12)


def test_ess_closed_forms():
    groups = make_groups(np.repeat([0, 1], [4, 3]), np.array([0, 1]))
    uniform = np.array([0.25] * 4 + [1 / 3] * 3)
    np.testing.assert_allclose(weights.ess_per_prompt(uniform, groups), [4.0, 3.0])
    one_heavy = np.array([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(weights.ess_per_prompt(one_heavy, groups), [1.0, 2.0])
    # pooled: 1 / Σ (w̄/P)² = P² / Σ 1/ESS_p
    assert weights.pooled_ess(np.array([4.0, 3.0])) == pytest.approx(4 / (1 / 4 + 1 / 3))


def test_khat_threshold_and_min_sample_size():
    assert weights.khat_threshold(100) == pytest.approx(0.5)
    assert weights.khat_threshold(10_000) == pytest.approx(0.7)  # 0.75 capped at 0.7
    assert weights.khat_threshold(10) == pytest.approx(0.0)
    assert weights.min_sample_size(0.5) == pytest.approx(100.0)
    assert weights.min_sample_size(-0.3) == pytest.approx(10.0)  # k̂ < 0 counts as 0
    assert weights.min_sample_size(0.999) == math.inf  # 10^1000 overflows: inf, no error
    assert weights.min_sample_size(1.2) == math.inf
    assert math.isnan(weights.min_sample_size(float("nan")))


def test_arviz1_wrapper_negates_its_input(rng):
    """The ≥ 1.0 code path, exercised on any install: a stand-in with the 1.x convention
    (weights ∝ exp(−input)), built from arviz 0.x when that is what is installed."""
    log_r = _pareto_log_ratios(rng, 300, k=0.6)[None, :]

    def psislw_1x(ary, r_eff=1):
        log_w, khat = _arviz_reference(-ary[0])  # reference takes ℓ; 1.x takes −ℓ
        return log_w[None, :], np.array([khat])

    via_1x = psis._arviz1(psislw_1x)(log_r)
    log_w, khat = _arviz_reference(log_r[0])
    np.testing.assert_allclose(via_1x[0][0], log_w, atol=1e-12)
    assert via_1x[1][0] == pytest.approx(khat, rel=1e-12)


def test_sign_check_rejects_a_backend_with_the_wrong_sign():
    def wrong_sign(log_r):
        # smooths the other tail: what passing +ℓ to arviz ≥ 1.0 would do
        log_w, khat = _arviz_reference(-log_r[0])
        return -log_w[None, :], np.array([khat])

    with pytest.raises(RuntimeError, match="sign check"):
        psis._check_sign(wrong_sign, "wrong-sign stand-in")
    psis._check_sign(psis.psis_backend()[1], "installed")  # the real one passes


def test_failed_slices_keep_raw_weights_and_nan_khat(rng):
    """arviz ≥ 1.0 raises for a whole batch if one slice has tied tail values: the batch is
    bisected so the other slices are still smoothed, in few calls."""
    log_r = np.stack([_pareto_log_ratios(rng, 30, k=0.5) for _ in range(16)])
    log_r[[3, 12]] = 0.5  # two tied slices
    calls = []

    def flaky(batch):
        calls.append(batch.shape[0])
        if np.any(np.all(batch == batch[:, :1], axis=1)):
            raise ValueError("All tail values are the same")
        refs = [_arviz_reference(row) for row in batch]
        return np.stack([w for w, _ in refs]), np.array([k for _, k in refs])

    log_w, khat = psis._guarded(flaky)(log_r)
    assert np.isnan(khat[[3, 12]]).all() and np.isfinite(np.delete(khat, [3, 12])).all()
    for b in (3, 12):
        np.testing.assert_allclose(log_w[b], np.full(30, -math.log(30)), rtol=1e-12)
    for b in (0, 7, 15):
        ref_w, ref_k = _arviz_reference(log_r[b])
        np.testing.assert_allclose(log_w[b], ref_w, atol=1e-12)
        assert khat[b] == pytest.approx(ref_k, rel=1e-12)
    assert len(calls) < 16  # bisection, not one call per slice


def test_weights_to_dict_is_json_ready(rng):
    import json

    res = weights.importance_weights(rng.normal(size=60), np.repeat([1, 2], 30))
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert '"scheme": "psis"' in text


def test_row_weights_are_the_weights_estimate_uses(rng):
    from isdelta.estimators import estimate

    log_p0 = -rng.gamma(3.0, 2.0, size=90)
    log_p1 = np.minimum(log_p0 + rng.normal(0.0, 0.5, size=90), 0.0)
    group = np.repeat([4, 2, 9], 30)[rng.permutation(90)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate(log_p0, log_p1, np.ones(90), group, weights="truncate")
    w = res.weights.w  # the caller's row order
    np.testing.assert_array_equal(w, weights.importance_weights(log_p1 - log_p0, group, scheme="truncate").w)
    h1 = np.mean([np.sum(w[group == p] * -log_p1[group == p]) for p in (2, 4, 9)])
    assert res.h1.value == pytest.approx(h1, rel=1e-12)
    for p in (2, 4, 9):
        assert w[group == p].sum() == pytest.approx(1.0, rel=1e-12)
