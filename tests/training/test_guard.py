"""EntropyGuard (issue 28): the optimizer's own step as the direction, undone exactly; the step is
linear in the lr; the guard holds a per-step ΔH band that the same run without it leaves; a
measurement the policy did not declare valid never moves it; an unpredictable step is taken
unscaled with the reason."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from isdelta.engine import EngineConfig, LogProbEngine
from isdelta.training import EntropyGuard, EntropyMonitor, GuardDecision, step_direction
from tests.conftest import TINY_LLAMA
from tests.training.test_monitor import sampled_rollouts, trainer_batch

BAND = (-0.05, math.inf)  # never lower the entropy rate by more than 0.05 nats per token in one step


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def entropy_loss(model, ro) -> torch.Tensor:
    """The mean next-token entropy over the rows' counted positions: minimising it is the
    sharpest entropy-lowering update (an entropy bonus with the wrong sign)."""
    sc = LogProbEngine(EngineConfig(requires_grad=True, progress=False)).score(model, ro)
    return sc.entropy_sum.sum() / ro.lengths.sum()


def halves(ro, G: int):
    """Rows g < G/2 of every prompt (trained on) and the others (fresh rows of p0 for the same
    prompts, read by the monitor and the guard: independent of the step)."""
    g = torch.arange(ro.n_rows) % G
    return ro.select(torch.nonzero(g < G // 2).flatten()), ro.select(torch.nonzero(g >= G // 2).flatten())


def train(base, steps: int, guard_kw: dict | None, lr: float = 3e-3, seed: int = 0):
    """AdamW steps on new samples of the current model (6 prompts × 8), each read on 8 more
    samples per prompt; per step the monitor's result and the guard's decision (None without a
    guard)."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    monitor = EntropyMonitor(model)
    guard = EntropyGuard(model, opt, **guard_kw) if guard_kw is not None else None
    rng = np.random.default_rng(seed)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            ro, fresh = halves(sampled_rollouts(model, rng, P=6, G=16, max_new=7), 16)
            snap = monitor.before(trainer_batch(fresh))
            opt.zero_grad()
            entropy_loss(model, ro).backward()
            if guard is None:
                opt.step()
            else:
                guard.step(snap)
            result = monitor.after(snap)
            out.append((result, guard.observe(result) if guard else None))
    return out, guard


@pytest.fixture(scope="module")
def runs(base):
    return train(base, 3, None), train(base, 5, {"band": BAND, "z": 2.0})


def test_step_direction_is_the_optimizers_step_undone_to_the_bit(base):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ro = sampled_rollouts(model, np.random.default_rng(1), P=2, G=3)
    for first in (True, False):  # a first step creates AdamW's state; a later one updates it
        opt.zero_grad()
        entropy_loss(model, ro).backward()
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = copy.deepcopy(opt.state_dict())
        d = step_direction(model, opt)
        assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())
        now = opt.state_dict()
        assert now["state"].keys() == state["state"].keys()
        for k, st in state["state"].items():
            assert all(torch.equal(now["state"][k][f], v) for f, v in st.items())
        assert (len(state["state"]) == 0) == first
        opt.step()  # the real step moves exactly d
        for n, p in model.named_parameters():
            assert torch.equal(p.detach() - theta[n], d[n]) if n in d else torch.equal(p, theta[n])
        assert len(d) == len(list(model.parameters()))


def test_the_step_is_proportional_to_the_lr(base):
    """The guard's premise: on the same gradients and state, AdamW at lr × s moves s·d (weight
    decay included), at a first step and at a later one."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ro = sampled_rollouts(model, np.random.default_rng(2), P=2, G=3)
    for _ in range(2):
        opt.zero_grad()
        entropy_loss(model, ro).backward()
        d = step_direction(model, opt)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.param_groups[0]["lr"] = 3e-4
        opt.step()
        opt.param_groups[0]["lr"] = 1e-3
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach() - theta[n], 0.3 * d[n], rtol=1e-4, atol=1e-7)  # fp32 rounding of θ


def test_the_guard_holds_a_band_the_unguarded_run_leaves(runs):
    (free, _), (guarded, guard) = runs
    free_tok = [r.delta_tok for r, _ in free if r.valid_tok]
    assert len(free_tok) >= 2
    assert all(e.ci_high < BAND[0] for e in free_tok)  # every unguarded step lowers it more (CI below the band)
    assert all("prefix ESS" in r.reason for r, _ in free if not r.valid_tok)  # or is too large to read
    measured = [(r.delta_tok, d) for r, d in guarded]
    assert all(r.valid_tok for r, _ in guarded)
    assert all(d.acted and d.scale < 1 for _, d in measured)
    inside = [e.ci_high >= BAND[0] for e, _ in measured]  # the band's edge within the step's CI, or above
    assert sum(inside) >= len(inside) - 1
    assert all(e.value >= BAND[0] - 0.01 for e, _ in measured)
    # every record is in the logger's scalars; the predictions had first order and then a trend
    s = guard.scalars()
    assert s["entropy/guard_scale"] == measured[-1][1].scale and s["entropy/guard_used"] == 1.0
    assert math.isfinite(s["entropy/guard_trend"]) and math.isfinite(s["entropy/guard_predicted"])
    assert all(d.used and d.measured == e.value for e, d in measured)


def test_a_measurement_not_declared_valid_never_moves_the_guard(runs, base):
    (_, _), (guarded, guard) = runs
    guard = copy.copy(guard)
    guard.history = list(guard.history)
    pending = GuardDecision(len(guard.history), 0.5, True, "a step", -0.2, 0.01, guard.correction, -0.1, 0.005)
    guard.history.append(pending)
    before = guard.correction, guard.trend
    monitor = EntropyMonitor(base)
    for result in (monitor.skip("the trainer skipped this step"), None):
        d = guard.observe(result)
        assert not d.used and d.measured is None and "not valid" in d.note and "unchanged" in d.note
        assert (guard.correction, guard.trend) == before
        assert math.isnan(guard.scalars()["entropy/guard_measured"])
        assert guard.scalars()["entropy/guard_used"] == 0.0
    assert "the trainer skipped this step" in monitor.skip("the trainer skipped this step").reason
    d = guard.observe(guarded[-1][0])  # a valid measurement does enter
    assert d.used and (guard.correction, guard.trend) != before


def test_an_unpredictable_step_is_taken_unscaled_with_the_reason(base):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = EntropyMonitor(model)
    ro = sampled_rollouts(model, np.random.default_rng(3), P=3, G=1)  # one row per prompt: no covariance
    snap = monitor.before(trainer_batch(ro))
    opt.zero_grad()
    entropy_loss(model, ro).backward()
    theta = [p.detach().clone() for p in model.parameters()]
    guard = EntropyGuard(model, opt, BAND)
    with pytest.warns(UserWarning, match="no prediction"):
        d = guard.step(snap)
    assert d.scale == 1.0 and not d.acted and "G ≥ 2" in d.reason and d.predicted is None
    assert any(not torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # the step was taken
    assert opt.param_groups[0]["lr"] == 1e-3
    strict = EntropyGuard(model, opt, BAND, strict=True)
    with pytest.raises(ValueError, match="G ≥ 2"):
        strict.step(snap)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"band": (0.01, 0.1)}, "contain 0"),
        ({"band": (-0.1, -0.01)}, "contain 0"),
        ({"band": (0.0, 0.0)}, "low ≤ 0 ≤ high"),
        ({"band": BAND, "level": "word"}, "level"),
        ({"band": BAND, "min_scale": 0.0}, "min_scale"),
        ({"band": BAND, "z": -1}, "z must"),
        ({"band": BAND, "memory": 1}, "memory"),
        ({"band": BAND, "correction_bounds": (2.0, 5.0)}, "correction_bounds"),
    ],
)
def test_bad_options_are_named(base, kw, match):
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        EntropyGuard(base, opt, **kw)
