"""estimate_tokens on prefix ratios past float64: the p1 terms are computed in log space, so
±50 nats per token gives finite numbers (pd_sn bounded by the data) and ±1e4 gives ±inf for the
per-sequence pd / cv figures, never NaN; ordinary inputs are untouched (bit-identical: the other
tests of estimate_tokens pass unchanged)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from isdelta.estimators import estimate_tokens


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
