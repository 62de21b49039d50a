"""LogitTransform's ranges: each refused value with its reason, and the engine's float32 statistics
at the accepted bounds against a float64 reference of the same logits (why the bounds are there)."""

from __future__ import annotations

import math

import pytest
import torch

from isdelta.engine import LogitTransform
from isdelta.engine.chunks import token_stats
from isdelta.engine.sampling import MAX_NUM_SAMPLES, SEED_MAX, check_sample_options
from isdelta.engine.transform import MAX_TEMPERATURE, MIN_TEMPERATURE

REFUSED = [
    (dict(temperature=1e-300), r"\[0\.01, 100\]; got 1e-300: logits / T overflows float32"),
    (dict(temperature=1e-6), r"\[0\.01, 100\]; got 1e-06: the float32 rounding .* 2 nats per token"),
    (dict(temperature=0.005), r"vLLM raises any temperature below 0\.01"),
    (dict(temperature=1e6), r"\[0\.01, 100\]; got 1e\+06: above 100 the tempered distribution nears uniform"),
    (dict(temperature=1e308), r"got 1e\+308"),
    (dict(temperature=0), r"must be > 0; got 0"),
    (dict(temperature=-1.0), r"must be > 0; got -1"),
    (dict(temperature=math.inf), r"finite number; got inf"),
    (dict(temperature=math.nan), r"finite number; got nan"),
    (dict(temperature="1"), r"finite number; got '1'"),
    (dict(top_k=-1), r"top_k must be a non-negative integer.*got -1"),
    (dict(top_k=math.inf), r"top_k .*got inf"),  # int(inf) is an OverflowError, not a ValueError
    (dict(top_k=math.nan), r"top_k .*got nan"),
    (dict(top_k=2.5), r"top_k .*got 2\.5"),
    (dict(top_p=0), r"top_p must lie in \(0, 1\]; got 0"),
    (dict(top_p=1.5), r"got 1\.5"),
    (dict(top_p=math.nan), r"got nan"),
]


@pytest.mark.parametrize("kw,pattern", REFUSED, ids=[f"{k}={v}" for kw, _ in REFUSED for k, v in kw.items()])
def test_values_the_statistics_cannot_use_are_refused_with_the_reason(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        LogitTransform(**kw)


def test_the_bounds_and_ordinary_values_are_accepted():
    for t in (MIN_TEMPERATURE, 0.7, 1, 1.3, MAX_TEMPERATURE):
        assert LogitTransform(t).temperature == t
    assert LogitTransform(top_k=10**30).top_k == 10**30  # larger than any vocabulary: no truncation
    assert LogitTransform(top_k=0, top_p=1e-300).truncates  # a tiny nucleus keeps the top token


@pytest.mark.parametrize("T", [1e-300, 1e-40])
def test_below_the_range_logits_over_t_overflow_and_every_statistic_is_nan(T):
    """What the lower bound prevents: the transform's own division overflows float32 (bypassing
    the check, as a value read before it existed would)."""
    t = object.__new__(LogitTransform)
    object.__setattr__(t, "temperature", T)
    object.__setattr__(t, "top_k", None)
    object.__setattr__(t, "top_p", 1.0)
    z = torch.tensor([[3.0, -2.0, 0.5, 1.0]])
    _, H, V, _ = token_stats(z, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), t)
    assert torch.isnan(H).all() and torch.isnan(V).all()


@pytest.mark.parametrize("T", [MIN_TEMPERATURE, 1.0, MAX_TEMPERATURE])
def test_at_the_bounds_float32_statistics_match_float64(T):
    """At both bounds the engine's float32 entropy and varentropy agree with float64 ones of the
    same logits (logits of SmolLM2's scale: std 3, |z| up to 40, V = 49152)."""
    g = torch.Generator().manual_seed(0)
    z = (3.0 * torch.randn(16, 49152, generator=g)).clamp(-40, 40)  # [M, V]
    z[:, 0] = 26.0  # a clear argmax, as an LM has
    rows, eos = torch.arange(16), torch.tensor([2])
    _, H, V, _ = token_stats(z.clone(), torch.zeros(16, dtype=torch.long), rows, eos, LogitTransform(T))
    lp = torch.log_softmax(z.double() / T, -1)  # the naive reference in float64
    p = lp.exp()
    H64 = -(p * lp).sum(-1)
    V64 = (p * (lp + H64[:, None]) ** 2).sum(-1)
    assert (H.double() - H64).abs().max() < 1e-4
    assert (V.double() - V64).abs().max() < 1e-3 * max(1.0, float(V64.max()))
    if T == MAX_TEMPERATURE:  # ln V − H, all that tells texts apart here, is still 10× float32's error on H
        assert float((H.double() - H64).abs().max()) < float((math.log(49152) - H64).min()) / 10


def test_sample_options_name_the_option_and_the_range():
    for kw, pattern in [
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63 - 1\]; got -1.*SeedSequence"),
        (dict(seed=SEED_MAX + 1), r"seed must be an integer"),
        (dict(num_samples=0), r"num_samples must be an integer in \[1, 16384\]; got 0"),
        (dict(num_samples=MAX_NUM_SAMPLES + 1), r"got 16385.*vLLM refuses more than 16384"),
        (dict(num_samples=10**30), r"num_samples must be an integer"),
        (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer; got 0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            check_sample_options(**kw)
    check_sample_options(num_samples=MAX_NUM_SAMPLES, max_new_tokens=1, seed=SEED_MAX)
