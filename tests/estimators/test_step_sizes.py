"""A step of any size ends in a headline (issue 30): valid with finite numbers inside the physical
bounds of entropy, or refused with its reasons; never an exception once the inputs are accepted,
never a nan marked valid.

Steps sweep the log-ratio log p1 − log p0 of a row over 10⁻⁶ … 10⁶ nats, both signs, in the shapes
that broke it in the field or could: every row moved alike, rows moved at random, one row far above
the rest, one prompt's rows far below. Each set is read with and without entropy sums (SNIS-RB or
plain SNIS) and with and without the per-decision estimates; numpy's overflow / invalid warnings
are errors here, so a quiet inf or nan in an estimator's arithmetic cannot hide either.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from isdelta.estimators import EstimatorWarning, estimate, estimate_tokens, headline
from isdelta.estimators import policy as headline_mod

P, G, C = 4, 8, 6  # prompts, rows per prompt, completion columns
GROUP = np.repeat(np.arange(P), G)
MAGNITUDES = [10.0**k for k in range(-6, 7)]  # nats per row
SHAPES = ("shift", "noise", "one_row_above", "prompt_below")
SUPPORT = 1000


def token_rows(rng, shape: str, size: float):
    """[N, C] per-token log-probs under p0 and p1 (≤ 0), entropies, ragged mask: the per-token
    log-ratios δ of a row sum to about ``size`` nats in the given shape."""
    N = P * G
    if shape == "shift":
        d = size * rng.uniform(0.5, 1.5, (N, C)) / C
    elif shape == "noise":
        d = size * rng.normal(0.0, 1.0, (N, C)) / C
    elif shape == "one_row_above":
        d = np.zeros((N, C))
        d[3] = abs(size) / C
    else:  # every row of prompt 0 far below
        d = np.zeros((N, C))
        d[:G] = -abs(size) / C
    lp0 = -rng.uniform(0.05, 3.0, (N, C)) - np.maximum(d, 0.0)
    mask = np.arange(C)[None, :] < rng.integers(1, C + 1, N)[:, None]
    return lp0, lp0 + d, rng.uniform(0.0, 3.0, (N, C)), rng.uniform(0.0, 3.0, (N, C)), mask


def row_sums(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, x, 0.0).sum(axis=1)


def assert_valid_or_refused(h) -> None:
    if not h.valid:
        assert h.reason and h.delta is None and h.h0 is None and h.h1 is None
        if not h.valid_tok:
            assert h.method == "none" and h.delta_tok is None
            return
        tok = [h.delta_tok, h.h0_tok, h.h1_tok]  # the per-token level alone: finite and bounded
        assert all(math.isfinite(e.value) and math.isfinite(e.se) for e in tok), tok
        assert 0 <= h.h1_tok.value <= math.log(SUPPORT) and h.delta_tok.value >= -h.h0_tok.value
        assert not all(c.passed for c in h.checks[h.method])  # a sequence-level check failed
        return
    picked = [h.delta, h.delta_tok, h.h0, h.h1, h.h0_tok, h.h1_tok]
    assert all(math.isfinite(e.value) and math.isfinite(e.se) for e in picked), picked
    assert h.h1.value >= 0 and h.h0.value >= 0 and 0 <= h.h1_tok.value <= math.log(SUPPORT)
    assert h.delta.value >= -h.h0.value and h.delta_tok.value >= -h.h0_tok.value
    assert all(c.passed for c in h.checks[h.method])


@pytest.mark.parametrize("rb", [True, False], ids=["rb", "plain"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["up", "down"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_step_size_ends_in_a_headline(rng, shape, sign, rb):
    refused = 0
    for size in MAGNITUDES:
        lp0, lp1, e0, e1, mask = token_rows(rng, shape, sign * size)
        ent = {"entropy_sum0": row_sums(e0, mask), "entropy_sum1": row_sums(e1, mask)} if rb else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)
            warnings.simplefilter("error", RuntimeWarning)  # numpy overflow / invalid / divide
            snis = estimate(row_sums(lp0, mask), row_sums(lp1, mask), mask.sum(1), GROUP, **ent)
            tokens = [estimate_tokens(lp0, lp1, e0, e1, mask, GROUP, method=m) for m in ("cv", "pd", "pd_sn")]
            for h in (headline(snis, support_size=SUPPORT), headline(snis, *tokens, support_size=SUPPORT)):
                assert_valid_or_refused(h)
                refused += not h.valid
    assert refused > 0  # the sweep reaches steps no method can read


@pytest.mark.parametrize("weights", ["none", "truncate", "clip"])
def test_every_step_size_ends_in_a_headline_with_other_weights(rng, weights):
    clip = 2.0 if weights == "clip" else None
    for size in MAGNITUDES:
        for sign in (1.0, -1.0):
            lp0, lp1, *_, mask = token_rows(rng, "noise", sign * size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EstimatorWarning)
                warnings.simplefilter("error", RuntimeWarning)
                snis = estimate(
                    row_sums(lp0, mask), row_sums(lp1, mask), mask.sum(1), GROUP, weights=weights, clip=clip
                )
                assert_valid_or_refused(headline(snis, support_size=SUPPORT))


def test_the_reported_crash_is_a_refused_headline():
    """The issue's reproduction: KL(p1‖p0) estimated at −10⁴ nats made exp(KL) underflow to 0 and
    the SNIS check divide by it (ZeroDivisionError)."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(8), 8)
    L = rng.integers(10, 30, 64).astype(float)
    S0 = -rng.uniform(10, 50, 64)
    S1 = S0 - np.abs(rng.normal(0, 1e4, 64)) - 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        r = estimate(S0, S1, L, group, entropy_sum0=-S0 * 0.8, entropy_sum1=-S1 * 0.8)
    assert r.kl_max < -1e3
    h = headline(r)
    assert not h.valid and "mean ratio p1/p0" in h.reason and "not estimable" in h.advice
    kl_check = next(c for c in h.checks["snis_rb"] if c.name.startswith("samples per prompt / exp(KL)"))
    assert math.isfinite(kl_check.value)  # G / exp(KL) in log space: 8·e^700 at most, never 8 / 0


def test_a_prefix_ratio_of_e50_inside_the_rows_is_not_a_valid_pd_headline(rng):
    """Every row's prefix ratio is e^50 at one column and back to 1 at the end: the prefix ESS and
    the full-sequence ratio look perfect, and pd's H1 was read as valid at 8e21 nats. The bound
    H1 ≤ C·ln|support| refuses it (pd_sn, a weighted mean of the data, is read instead)."""
    N = P * G
    d = np.zeros((N, C))
    d[:, 1], d[:, 2] = 50.0, -50.0
    lp0 = -rng.uniform(0.05, 3.0, (N, C)) - np.maximum(d, 0.0)
    e0, e1, mask = rng.uniform(0, 3, (N, C)), rng.uniform(0, 3, (N, C)), np.ones((N, C), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        snis = estimate(row_sums(lp0, mask), row_sums(lp0 + d, mask), mask.sum(1), GROUP)
        pd = estimate_tokens(lp0, lp0 + d, e0, e1, mask, GROUP, method="pd")
        sn = estimate_tokens(lp0, lp0 + d, e0, e1, mask, GROUP, method="pd_sn")
    assert pd.h1.value > 1e20 and pd.prefix_ess_frac_min == 1.0 and pd.mean_ratio_min == pytest.approx(1.0)
    h = headline(snis, pd, sn, support_size=SUPPORT)
    assert h.method == "pd_sn"
    bound = next(c for c in h.checks["pd"] if c.name.startswith("H(p1) per sequence vs"))
    assert not bound.passed and bound.threshold == pytest.approx(C * math.log(SUPPORT))


@pytest.mark.parametrize("where", ["log_p1", "token_logp1"])
def test_a_minus_inf_log_ratio_is_refused_at_the_input_naming_it(rng, where):
    """log p1 = −inf (p1 gives a sampled token zero probability) is not a step size but scores
    from different supports: refused before any estimate, naming the argument and the fix."""
    lp0, lp1, e0, e1, mask = token_rows(rng, "noise", 1.0)
    lp1[0, 0], mask[0, 0] = -np.inf, True
    with pytest.raises(ValueError, match=rf"^{where}: expected finite.*same sampling transform"):
        if where == "log_p1":
            estimate(row_sums(lp0, mask), row_sums(lp1, mask), mask.sum(1), GROUP)
        else:
            estimate_tokens(lp0, lp1, e0, e1, mask, GROUP)


@pytest.mark.parametrize(
    "fields",
    [
        {"kl_max": math.nan},
        {"kl_max": math.inf},
        {"mean_ratio_max": math.nan},
        {"mean_ratio_min": math.nan},
        {"ess_frac": math.nan},
        {"ess_frac": 0.0},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_a_nan_or_inf_diagnostic_fails_its_check_and_the_advice_still_reads(rng, fields):
    """Diagnostics of a result built or edited by hand: a nan never passes a check (min() and
    max() would drop it), and the advice is text, not an exception."""
    import dataclasses

    lp0, lp1, e0, e1, mask = token_rows(rng, "noise", 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        snis = estimate(row_sums(lp0, mask), row_sums(lp1, mask), mask.sum(1), GROUP)
    assert headline(snis).valid
    h = headline(dataclasses.replace(snis, **fields))
    assert not h.valid and h.reason and isinstance(h.advice, str)
    assert headline_mod.METHOD_CODES[h.method] == 0
