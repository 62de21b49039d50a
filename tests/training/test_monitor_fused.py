"""The monitor's fused-or-eager decision (training/pinned.py): made once, at the first scored batch,
for ``fused.MONITOR_STEPS`` steps of that size, then kept for every step; p0 and p1 of a step on
one path whatever compiles in the process meanwhile (ΔH of p1 = p0 exactly 0). Compared against
the engine's own per-call rule and a spy on the compiled statistics."""

from __future__ import annotations

import copy
import os
import shutil
import warnings

import pytest
import torch

import isdelta.engine.fused as fused_mod
from isdelta.engine import EngineConfig, LogProbEngine, Rollouts
from isdelta.training import EntropyMonitor

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler on PATH: torch.compile cannot build the fused CPU kernel here",
)

ENGINE = EngineConfig(progress=False)
CPU = torch.device("cpu")


def rollouts(rng, P=4, G=4, V=96) -> Rollouts:
    """Ragged prompts and completions, some stopping at EOS = pad = 2."""
    prompts = [rng.integers(3, V, size=rng.integers(1, 6)).tolist() for _ in range(P)]
    comps = []
    for _ in range(P * G):
        c = rng.integers(3, V, size=rng.integers(1, 8)).tolist()
        if rng.random() < 0.5:
            c[rng.integers(0, len(c))] = 2
        comps.append(c)
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def n_logits(ro: Rollouts) -> int:
    return int(ro.mask(True).sum()) * 96  # tiny_llama's V


@pytest.fixture
def model(tiny_llama):
    return copy.deepcopy(tiny_llama)


def test_a_step_too_small_for_one_call_fuses_for_the_whole_run(model, rng, fused_calls, monkeypatch):
    """Break-even between one call and ten steps: the engine's per-call "auto" stays eager, the
    monitor compiles at its first step, and keeps that path after the rule would say otherwise."""
    ro = rollouts(rng)
    monkeypatch.setitem(fused_mod.FUSE_MIN_LOGITS, "cpu", 2 * n_logits(ro) * fused_mod.MONITOR_STEPS)
    assert not LogProbEngine(ENGINE).fuses(n_logits(ro), CPU)  # the old rule: eager every step
    mon = EntropyMonitor(model, engine_config=ENGINE)
    assert mon.fused is None
    snap = mon.before(ro)
    assert mon.fused is True and fused_calls, "p0 did not take the compiled statistics"
    n_p0 = len(fused_calls)
    monkeypatch.setitem(fused_mod.FUSE_MIN_LOGITS, "cpu", 2**62)  # the rule changes between p0 and p1
    res = mon.after(snap)
    assert len(fused_calls) == 2 * n_p0, "p1 left p0's path"
    assert res.valid and res.delta.value == 0.0 and res.delta_snis.value == 0.0  # p1 = p0: bit-identical
    mon.after(mon.before(rollouts(rng, P=2, G=3)))  # a later, smaller step: still compiled
    assert len(fused_calls) > 2 * n_p0 and mon.fused is True


def test_an_eager_monitor_stays_eager_when_a_kernel_is_compiled_meanwhile(model, rng, fused_calls):
    """The rule never reads "is a kernel compiled": a compile between p0 and p1 (another engine,
    the trainer) or between steps changes nothing, so p1 = p0 still gives ΔH = 0 exactly."""
    ro = rollouts(rng)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    snap = mon.before(ro)
    assert mon.fused is False and fused_calls == []
    LogProbEngine(ENGINE, fused="on").score(model, ro)  # compiled now, in this process
    assert fused_calls
    n = len(fused_calls)
    res = mon.after(snap)
    assert len(fused_calls) == n and mon.fused is False
    assert res.valid and res.delta.value == 0.0 and res.delta_snis.value == 0.0
    mon.after(mon.before(ro))
    assert len(fused_calls) == n


def test_reused_old_logp_counts_one_scored_call_a_step(model, rng, monkeypatch):
    """Without a p0 forward a step scores once: ten steps of one call must reach the break-even."""
    ro = rollouts(rng)
    old = LogProbEngine(ENGINE).score(model, ro).token_logp  # the trainer's log p0
    for threshold, fuses in ((n_logits(ro) * fused_mod.MONITOR_STEPS, True), (n_logits(ro) * 11, False)):
        monkeypatch.setitem(fused_mod.FUSE_MIN_LOGITS, "cpu", threshold)
        mon = EntropyMonitor(model, engine_config=ENGINE)
        snap = mon.before(ro, old_logp=old)
        assert snap.reused_old_logp and mon.fused is None  # nothing scored yet: nothing decided
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random rows are no samples of p0: the plain estimate may be refused
            mon.after(snap)
        assert mon.fused is fuses


@pytest.mark.parametrize("fused", ["on", "off"])
def test_on_and_off_are_kept_as_given(model, rng, fused_calls, fused):
    ro = rollouts(rng)
    mon = EntropyMonitor(model, engine_config=EngineConfig(progress=False, fused=fused))
    res = mon.after(mon.before(ro))
    assert mon.fused is (fused == "on") and bool(fused_calls) is (fused == "on")
    assert res.delta.value == 0.0


def test_a_failed_compile_leaves_every_step_eager(model, rng, monkeypatch):
    """Pinned "on" but torch.compile fails at p0: p0 and p1 both run eagerly, and ``fused`` says so."""

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(fused_mod, "_compiled", lambda: broken)
    monkeypatch.setattr(fused_mod, "_failed", set())
    ro = rollouts(rng)
    mon = EntropyMonitor(model, engine_config=EngineConfig(progress=False, fused="on"))
    res = mon.after(mon.before(ro))
    assert mon.fused is False and res.delta.value == 0.0
