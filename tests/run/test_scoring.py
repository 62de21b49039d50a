"""The run's score files (run/scoring.py): each records the path its rows took (compiled or eager
chunk statistics), and a later file of the same samples (p1 after p0, perhaps in a resumed
process) takes that path, whatever that process's own rule or compiled kernels would say; p1 = p0
then gives bit-identical arrays."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import isdelta.engine.fused as fused_mod
from isdelta.engine import LogitTransform, Rollouts
from isdelta.run.scoring import fused_path, score_stage

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler on PATH: torch.compile cannot build the fused CPU kernel here",
)

FIELDS = ("token_logp", "token_entropy", "token_varentropy", "logp", "entropy_sum", "stop_entropy_sum")


class Folder:
    """The part of OutputFolder that score_stage uses: load a recorded part, record a new one."""

    def __init__(self, path):
        self.path, self.parts = path, set()

    def load(self, name, inputs, reader):
        return reader(self.path / name) if name in self.parts else None

    def record(self, name, inputs):
        self.parts.add(name)


def config(fused="auto"):
    return SimpleNamespace(engine=SimpleNamespace(token_budget=16384, fused=fused))


def rollouts(rng) -> Rollouts:
    prompts = [rng.integers(3, 96, size=rng.integers(1, 6)).tolist() for _ in range(3)]
    comps = [rng.integers(3, 96, size=rng.integers(1, 8)).tolist() for _ in range(9)]
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def score(cfg, model, ro, folder, name, like=None):
    return score_stage(cfg, model, ro, LogitTransform(), folder, name, "inputs", like)


@pytest.mark.parametrize("p0_fused", ["auto", "on"])
def test_p1_takes_the_path_p0_recorded_in_a_process_whose_rule_says_otherwise(
    tiny_llama, rng, tmp_path, fused_calls, monkeypatch, p0_fused
):
    ro, folder = rollouts(rng), Folder(tmp_path)
    s0 = score(config(p0_fused), tiny_llama, ro, folder, "scores0.npz")  # auto: eager at this size
    assert s0["fused"].shape == (ro.n_rows,) and bool(s0["fused"].all()) is (p0_fused == "on")
    n0 = len(fused_calls)
    assert (n0 > 0) is (p0_fused == "on")
    # the resumed process: a kernel compiled or not, and "auto" now saying the opposite of p0's path
    monkeypatch.setitem(fused_mod.FUSE_MIN_LOGITS, "cpu", 1 if p0_fused == "auto" else 2**62)
    saved = Folder(tmp_path)
    saved.parts.add("scores0.npz")
    s0 = score(config(), None, ro, saved, "scores0.npz")  # read back, as a resumed run does
    s1 = score(config(), tiny_llama, ro, saved, "scores1.npz", like=s0)
    assert np.array_equal(s1["fused"], s0["fused"]) and (len(fused_calls) > n0) is (p0_fused == "on")
    for f in FIELDS:  # p1 = p0: bit-identical, so ΔH = 0 exactly
        assert np.array_equal(s1[f], s0[f]), f


def test_a_file_without_a_record_leaves_the_configured_rule():
    assert fused_path(None, "auto") == "auto" and fused_path({"logp": np.zeros(2)}, "auto") == "auto"
    assert fused_path({"fused": np.ones(3, bool)}, "off") == "on"
    assert fused_path({"fused": np.zeros(3, bool)}, "on") == "off"


def test_a_compile_that_fails_only_for_p1_is_recorded_and_said(tiny_llama, rng, tmp_path, monkeypatch, capsys):
    ro, folder = rollouts(rng), Folder(tmp_path)
    s0 = score(config("on"), tiny_llama, ro, folder, "scores0.npz")
    assert s0["fused"].all()

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(fused_mod, "_compiled", lambda: broken)
    monkeypatch.setattr(fused_mod, "_failed", set())
    s1 = score(config(), tiny_llama, ro, folder, "scores1.npz", like=s0)
    assert not s1["fused"].any()
    err = capsys.readouterr().err
    assert "scores1.npz" in err and "eager" in err and "not bit for bit" in err
    np.testing.assert_allclose(s1["entropy_sum"], s0["entropy_sum"], rtol=1e-5)
