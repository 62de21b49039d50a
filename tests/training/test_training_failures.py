"""Training-side failures named for what they are: a snapshot belongs to the monitor that took
it (another monitor, of another model, refuses it instead of reporting a ΔH between unrelated
models); a step that overflows the weights says "lower lr", not "use float32", and an overflowing
loss without truncation is not blamed on top-k/top-p."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from isdelta.engine import EngineConfig, Rollouts
from isdelta.training import EntropyMonitor, MonitorError, MonitorWarning


def rollouts(rng) -> Rollouts:
    prompts = [rng.integers(3, 96, size=3).tolist() for _ in range(2)]
    comps = [rng.integers(3, 96, size=4).tolist() for _ in range(8)]
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def test_another_monitors_snapshot_is_refused(tiny_llama, tiny_gpt2, rng):
    ro = rollouts(rng)
    engine = EngineConfig(progress=False)
    theirs = EntropyMonitor(copy.deepcopy(tiny_gpt2), engine_config=engine, group_by="given", eos_token_ids=2)
    snap = theirs.before(ro)
    for strict in (False, True):
        ours = EntropyMonitor(tiny_llama, engine_config=engine, group_by="given", eos_token_ids=2, strict=strict)
        if strict:
            with pytest.raises(MonitorError, match="another EntropyMonitor"):
                ours.after(snap)
        else:
            with pytest.warns(MonitorWarning, match="another EntropyMonitor"):
                res = ours.after(snap)
            assert not res.valid and res.estimate is None


def test_a_step_that_overflows_the_weights_says_lower_lr(tiny_llama, rng):
    from isdelta.training import update

    ro = rollouts(rng)
    with pytest.raises(FloatingPointError, match=r"Lower lr") as info:  # the forward or the gradient overflows
        update(copy.deepcopy(tiny_llama), loss="sft", rollouts=ro, lr=1e30, steps=2, progress=False)
    assert "float16" not in str(info.value)
    assert torch.isfinite(tiny_llama.lm_head.weight).all()


def test_an_overflowing_loss_without_truncation_is_not_blamed_on_top_k(tiny_llama, rng, monkeypatch):
    """No top-k/top-p: a −inf log-prob can only be an overflow, and the message says so."""
    from types import SimpleNamespace

    from isdelta.engine import LogProbEngine
    from isdelta.training import update

    ro = rollouts(rng)
    minus_inf = SimpleNamespace(token_logp=torch.full((ro.n_rows, ro.completion_ids.shape[1]), -math.inf))
    monkeypatch.setattr(LogProbEngine, "score", lambda self, model, rows: minus_inf)
    with pytest.raises(FloatingPointError, match="logits overflowed") as info:
        update(copy.deepcopy(tiny_llama), loss="sft", rollouts=ro, lr=1e-3, progress=False)
    assert "top-k/top-p set" not in str(info.value)
