"""estimate_tokens on prefix ratios past float64: the p1 terms are computed in log space, so
±50 nats per token gives finite numbers (pd_sn bounded by the data) and ±1e4 gives ±inf for the
per-sequence pd / cv figures, never NaN; ordinary inputs are untouched (bit-identical: the other
tests of estimate_tokens pass unchanged)."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from isdelta.estimators import EstimatorWarning, estimate, estimate_tokens, headline


def heavy(rng, magnitude: float, N: int = 16, C: int = 12):
    """Per-token log-ratios ±magnitude (log-probs ≤ 0 under both models), entropies in [0, 3]."""
    d = rng.choice([-1.0, 1.0], (N, C)) * magnitude
    base = -rng.uniform(0.1, 3.0, (N, C))
    lp0 = np.where(d > 0, base - d, base)
    return lp0, lp0 + d, rng.uniform(0, 3, (N, C)), rng.uniform(0, 3, (N, C)), np.ones((N, C), bool)


def values(res) -> list[float]:
    return [getattr(res, k).value for k in ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok")] + [
        getattr(res, k).se for k in ("h1", "delta", "delta_tok")
    ]


@pytest.mark.parametrize("magnitude", [50.0, 1e4])
@pytest.mark.parametrize("method", ["cv", "pd", "pd_sn"])
def test_huge_log_ratios_give_no_nan(rng, magnitude, method):
    args = heavy(rng, magnitude)
    group = np.repeat(np.arange(4), 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate_tokens(*args, group, method=method)
    assert not any(math.isnan(v) for v in values(res)), values(res)
    if method == "pd_sn":  # self-normalised: a weighted mean of observed entropies, bounded
        assert 0 <= res.h1_tok.value <= 3 and -3 <= res.delta_tok.value <= 3
    elif magnitude == 50.0:
        assert all(math.isfinite(v) for v in values(res))
    else:  # past float64: honest infinities, and a warning that says why
        assert math.isinf(res.h1.value) and any("prefix ratios up to e^" in str(w.message) for w in caught)
    assert math.isfinite(res.h0.value) and math.isfinite(res.direct.value)


# ---------------------------------------------------------------------------------------------
# astronomic values name the physical bound they break (issue 30)


def snis_of(args, group):
    lp0, lp1, *_ = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(lp0.sum(1), lp1.sum(1), np.full(lp0.shape[0], lp0.shape[1]), group)


@pytest.mark.parametrize(
    "method, broken",
    [("pd", r"H\(p1\) per sequence vs 12 positions · log\|support\| [0-9.e+]+ ✗ \(needs ≤ 130\)"),
     ("cv", r"H\(p1\) per sequence -[0-9.e+]+ ✗ \(needs ≥ 0\)")],
)  # fmt: skip
def test_an_astronomic_estimate_says_which_bound_it_breaks(rng, method, broken):
    """Heavy-tailed prefix ratios (±50 nats per token): pd's H1 per sequence is ~1e190 nats, cv's
    far below 0. The warning names the value, the bound and that the headline refuses it; the
    result carries the broken bounds; the headline's own check of the method fails the same way."""
    args = heavy(rng, 50.0)
    group = np.repeat(np.arange(4), 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate_tokens(*args, group, method=method, support_size=50_257)
    pattern = rf"^{method}: estimates outside the physical bounds of entropy: .*{broken}"
    assert any(w.category is EstimatorWarning and re.search(pattern, str(w.message)) for w in caught)
    warning = next(w for w in res.warnings if "physical bounds" in w)
    assert f"headline() refuses {method} here" in warning and "smaller update step" in warning
    assert res.out_of_bounds and res.max_length == 12
    h = headline(snis_of(args, group), res, support_size=50_257)
    failed = [str(c) for c in h.checks[method] if not c.passed]
    assert set(res.out_of_bounds) <= set(failed) and h.method != method


def test_the_bounds_estimate_tokens_found_stand_when_the_headline_is_given_no_support(rng):
    """estimate_tokens was told the support (4 tokens: H ≤ ln 4 per token), headline was not:
    the bounds broken under the support it knew still rule the method out."""
    lp0, lp1, e0, e1, mask = heavy(rng, 0.0)
    group = np.repeat(np.arange(4), 4)  # entropies up to 3 nats > ln 4: the data break the bound
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate_tokens(lp0, lp1, e0, e1, mask, group, method="pd_sn", support_size=4)
    assert any("pd_sn averages the token entropies given" in str(w.message) for w in caught)
    assert any("per token vs log|support|" in b for b in res.out_of_bounds)
    h = headline(snis_of((lp0, lp1), group), res)
    bound = next(c for c in h.checks["pd_sn"] if c.name.startswith("bounds estimate_tokens found broken"))
    assert not bound.passed and h.method != "pd_sn"


def test_ordinary_estimates_break_no_bound(rng):
    lp0, lp1, e0, e1, mask = heavy(rng, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorWarning)
        res = estimate_tokens(lp0, lp1, e0, e1, mask, np.repeat(np.arange(4), 4), support_size=50_257)
    assert res.out_of_bounds == () and res.max_length == 12
