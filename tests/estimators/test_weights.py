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


def _rows_of_every_kind(rng) -> list[np.ndarray]:
    """Light and heavy tails, nearly constant ratios, ties (identical completions), many sizes."""
    rows = []
    for S in (25, 26, 30, 40, 64, 100, 226, 500, 1000):
        rows += [
            rng.normal(0.0, 0.5, S),
            _pareto_log_ratios(rng, S, k=0.5),
            _pareto_log_ratios(rng, S, k=0.9),
            rng.normal(0.0, 1e-6, S),
            np.round(rng.normal(0.0, 1.0, S), 1),
        ]
    return rows


def test_vectorised_psis_equals_installed_arviz_row_by_row(rng):
    """One batched call over rows of equal S == arviz's own psislw on each row (the reference)."""
    rows = _rows_of_every_kind(rng)
    for S in sorted({len(r) for r in rows}):
        batch = np.stack([r for r in rows if len(r) == S])  # [B, S]
        log_w, khat = psis.psis(batch)
        for b, row in enumerate(batch):
            ref_w, ref_k = _arviz_reference(row)
            np.testing.assert_allclose(log_w[b], ref_w - np.logaddexp.reduce(ref_w), atol=1e-12)
            assert (np.isnan(khat[b]) and not np.isfinite(ref_k)) or khat[b] == pytest.approx(ref_k, abs=1e-12)


def test_vectorised_psis_equals_arviz_stats_1x(rng):
    """The arviz ≥ 1.0 convention (tail size, tie rule, guards) against arviz-stats itself, where
    installed (Python ≥ 3.12); it takes −ℓ and raises on a tail of equal values."""
    try:
        from arviz_stats.base.array import array_stats
    except ImportError:
        pytest.skip("arviz-stats ≥ 1.0 is not installed (Python < 3.12 resolves arviz 0.x)")
    for row in _rows_of_every_kind(rng):
        log_w, khat = psis.psis(row[None], "arviz1")
        try:
            ref_w, ref_k = array_stats.psislw(-row[None], r_eff=1)
        except ValueError:  # all tail values equal: isdelta keeps the raw weights, k̂ = nan
            assert np.isnan(khat[0])
            np.testing.assert_allclose(log_w[0], row - np.logaddexp.reduce(row), atol=1e-12)
            continue
        ref_k = float(np.ravel(ref_k)[0])
        np.testing.assert_allclose(log_w[0], np.ravel(ref_w), atol=1e-12)
        assert (np.isnan(khat[0]) and not np.isfinite(ref_k)) or khat[0] == pytest.approx(ref_k, abs=1e-12)


@pytest.mark.parametrize("flavour", ["arviz0", "arviz1"])
def test_psis_flavours_agree_on_what_they_share(rng, flavour):
    """Either convention: smoothed weights rise with the raw ones, a heavy tail reads heavy and a
    light one light, a tail of equal values is left raw with k̂ = nan, rows do not interact."""
    heavy, light = _pareto_log_ratios(rng, 400, k=0.8), rng.normal(0.0, 0.1, 400)
    tied = np.concatenate([rng.normal(0.0, 1.0, 300), np.full(100, 5.0)])
    log_w, khat = psis.psis(np.stack([heavy, light, tied]), flavour)
    order = np.argsort(heavy)
    assert np.all(np.diff(log_w[0][order]) >= -1e-12) and 0.6 < khat[0] < 1.0 and khat[1] < 0.3
    assert np.isnan(khat[2]) and np.allclose(log_w[2], tied - np.logaddexp.reduce(tied), atol=1e-12)
    alone = psis.psis(light[None], flavour)
    np.testing.assert_array_equal(alone[0][0], log_w[1])


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


def test_pooled_khat_fits_ratios_relative_to_their_prompt(rng):
    """One tail fit over all rows of r / mean_p(r): a prompt's scale does not matter, a heavy tail
    in one prompt does; fewer than 25 rows give nan."""
    sizes = [16, 16, 16, 16]
    group = np.repeat(np.arange(4), 16)
    groups = make_groups(group, np.arange(4))
    light = rng.normal(0.0, 0.3, 64)
    shifted = light + np.repeat([0.0, 3.0, -2.0, 7.0], sizes)  # each prompt's mean ratio moved
    k_light, S = psis.pooled_khat(light, groups)
    assert S == 64 and psis.pooled_khat(shifted, groups)[0] == pytest.approx(k_light, abs=1e-9)
    heavy = light.copy()
    heavy[:16] = _pareto_log_ratios(rng, 16, k=1.5)
    assert psis.pooled_khat(heavy, groups)[0] > k_light + 0.2
    small = make_groups(np.repeat([0, 1], 10), np.arange(2))
    assert math.isnan(psis.pooled_khat(rng.normal(size=20), small)[0])


def test_pareto_smooth_in_blocks_equals_one_batch(rng, monkeypatch):
    """Prompts go to psis in blocks of ~BLOCK_ROWS rows (gathered where they are not consecutive
    rows of one size): any block size gives the same floats, constant prompts kept as they are."""
    sizes = [30, 30, 45, 30, 45, 30]
    codes = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # interleaved rows, sorted below
    groups = make_groups(codes, np.arange(len(sizes)))
    log_r = groups.sort(rng.normal(0.0, 0.7, codes.size))
    log_r[groups.starts[3] : groups.starts[3] + 30] = -0.5  # a constant prompt: no tail fit
    one = psis.pareto_smooth(log_r, groups, per_prompt=True)
    monkeypatch.setattr(psis, "BLOCK_ROWS", 40)
    blocks = psis.pareto_smooth(log_r, groups, per_prompt=True)
    for a, b in zip(one, blocks):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(one[1][3]) and one[3][3]


def test_mean_ratio_is_the_log_space_mean_of_the_raw_ratios(rng):
    groups = make_groups(np.repeat(np.arange(4), 30), np.arange(4))
    log_r = rng.normal(0.0, 2.0, 120)
    for scheme in ("none", "psis", "truncate"):
        np.testing.assert_array_equal(weights.weigh(log_r, groups, scheme, None).mean_ratio, groups.mean_exp(log_r))
