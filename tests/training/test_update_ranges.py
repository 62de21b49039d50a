"""update()'s lr and steps: values float32 cannot step with are refused before any work, an lr
that overflows the weights' own dtype is named, and a step that changes no weight is never
reported as a measured ΔH = 0 (ZeroUpdateError, compared bit for bit against θ0)."""

from __future__ import annotations

import copy

import pytest
import torch

from isdelta.engine import Rollouts
from isdelta.training import update
from isdelta.training.update import LR_MAX, LR_MIN, MAX_STEPS, ZeroUpdateError, check_step_options


def rollouts(rng) -> Rollouts:
    prompts = [rng.integers(3, 96, size=3).tolist() for _ in range(2)]
    comps = [rng.integers(3, 96, size=4).tolist() for _ in range(8)]
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(lr=0.0), r"lr must be > 0 and finite; got 0"),
        (dict(lr=-1e-3), r"got -0\.001"),
        (dict(lr=float("nan")), r"got nan"),
        (dict(lr=1e-300), r"lr must lie in \[1\.2e-38, 3\.4e\+38\].*got 1e-300.*rounds to a subnormal or 0"),
        (dict(lr=1e308), r"got 1e\+308: the optimizer applies it in the weights' float32, where it overflows"),
        (dict(steps=0), r"steps must be an integer in \[1, 10000\]; got 0"),
        (dict(steps=10**30), r"got 1000000000000000000000000000000.*re-use one batch"),
        (dict(steps=2.5), r"got 2\.5"),
    ],
)
def test_out_of_range_options_are_refused_before_any_work(tiny_llama, rng, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_step_options(**kw)
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match=pattern):
        update(model, loss="sft", rollouts=rollouts(rng), progress=False, **{"lr": 1e-3, **kw})
    for a, b in zip(model.parameters(), tiny_llama.parameters()):
        assert torch.equal(a, b)


def test_the_range_ends_are_accepted():
    check_step_options(lr=LR_MIN, steps=1)
    check_step_options(lr=LR_MAX, steps=MAX_STEPS)


def test_a_step_below_the_weights_resolution_is_a_zero_update_not_a_measured_zero(tiny_llama, rng):
    """lr 1e-30 is a valid float32 number, but lr·∇ is far below 2^-24 of every weight: θ1 == θ0."""
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ZeroUpdateError, match=r"the step changed no weight: lr 1e-30 .* float32 weight.*Raise lr"):
        update(model, loss="sft", rollouts=rollouts(rng), lr=1e-30, progress=False)
    res = update(copy.deepcopy(tiny_llama), loss="sft", rollouts=rollouts(rng), lr=1e-3, progress=False)
    assert res.param_change_norm > 0


def test_an_lr_that_overflows_float16_weights_is_named(tiny_llama, rng):
    model = copy.deepcopy(tiny_llama).half()
    with pytest.raises(FloatingPointError, match=r"lr 100000 overflows the float16 weights, .*largest 65504"):
        update(model, loss="sft", rollouts=rollouts(rng), lr=1e5, progress=False)
