"""Curriculum schedules beyond increasing/decreasing: the saw-tooth (what its steps, shards,
schedule.json and order.csv hold, against a hand-built expectation) and the combined key
entropy − λ·(√)varentropy (the order it sorts by, against numpy)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from isdelta.program import ConfigError
from isdelta.score import score
from isdelta.score.config import load_score_config
from isdelta.score.curriculum import build_curriculum, combine_key


def test_sawtooth_steps_are_ramps_over_strided_bin_members(rng):
    key = rng.normal(size=23)
    key[4] = np.nan
    cur = build_curriculum(key, 3, "count", "sawtooth", cycles=2)
    steps = cur.steps()
    assert cur.schedule == [0, 1, 2, 0, 1, 2] and [(c, b) for c, b, _ in steps] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)
    ]  # fmt: skip
    for c, b, pos in steps:  # ramp c holds members c, c + 2, c + 4, … of the bin, by increasing key
        np.testing.assert_array_equal(pos, cur.members(b)[c::2])
        assert np.all(np.diff(key[pos]) >= 0)
    emitted = np.concatenate([pos for _, _, pos in steps])
    assert sorted(emitted.tolist()) == sorted(np.flatnonzero(np.isfinite(key)).tolist())  # each text once
    for c in range(2):  # within a ramp the key rises from bin to bin: easy → hard, then again
        ramp = np.concatenate([pos for cc, _, pos in steps if cc == c])
        assert np.all(np.diff(key[ramp]) >= 0)


def test_sawtooth_of_one_cycle_is_increasing(rng):
    key = rng.normal(size=17)
    saw, inc = build_curriculum(key, 4, "count", "sawtooth", cycles=1), build_curriculum(key, 4)
    assert [p.tolist() for *_, p in saw.steps()] == [p.tolist() for *_, p in inc.steps()]


def test_cycles_only_with_a_sawtooth():
    with pytest.raises(ValueError, match="a saw-tooth needs cycles >= 1"):
        build_curriculum(np.arange(5.0), 2, schedule="sawtooth")
    with pytest.raises(ValueError, match="the other schedules none"):
        build_curriculum(np.arange(5.0), 2, schedule="increasing", cycles=2)


def test_combined_key_is_entropy_minus_lambda_varentropy(rng):
    H, V = rng.gamma(3.0, 0.5, 40), rng.gamma(2.0, 1.0, 40)
    for lam in (0.0, 0.5, 2.0):
        key = combine_key([(H, 1.0), (np.sqrt(V), -lam)])
        np.testing.assert_allclose(key, H - lam * np.sqrt(V), rtol=0, atol=1e-15)
        cur = build_curriculum(key, 4)
        np.testing.assert_array_equal(cur.order, np.argsort(H - lam * np.sqrt(V), kind="stable"))
    assert not np.array_equal(build_curriculum(H, 4).order, build_curriculum(H - 2 * np.sqrt(V), 4).order)


def corpus(tmp_path, n=14) -> str:
    words = ["the cat sat", "qzx plok", "1 2 3 4", "hello there", "zzzz", "a b a b a", "Roses are red"]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"id": f"t{i}", "text": words[i % 7] * (1 + i % 3)}) + "\n" for i in range(n)))
    return str(p)


def test_program_emits_the_documented_sawtooth_with_a_combined_key(tmp_path, checkpoint):
    raw = {
        "models": [{"name": "a", "path": str(checkpoint)}],
        "data": {"path": corpus(tmp_path)},
        "engine": {"chunk_texts": 7, "token_budget": 256},
        "curriculum": {
            "key": {"entropy_mean": 1.0, "sqrt_varentropy_mean": -0.5},
            "bins": 3,
            "schedule": "sawtooth",
            "cycles": 2,
        },
        "compare": None,
        "output": {"dir": str(tmp_path / "out"), "plots": False},
    }
    summary = score(load_score_config(raw))
    out = tmp_path / "out" / "curriculum"
    stats = {
        json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "out/models/a/stats.jsonl").read_text().splitlines()
    }
    key = {i: r["entropy_mean"] - 0.5 * np.sqrt(r["varentropy_mean"]) for i, r in stats.items()}
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["order"] == [0, 1, 2, 0, 1, 2] and sched["cycles"] == 2
    assert sched["shards"] == [f"cycle-{c}-bin-{b:02d}.jsonl" for c in range(2) for b in range(3)]
    ids = []
    for c in range(2):
        ramp = [
            json.loads(x)["id"]
            for b in range(3)
            for x in (out / f"cycle-{c}-bin-{b:02d}.jsonl").read_text().splitlines()
        ]
        assert [key[i] for i in ramp] == pytest.approx(sorted(key[i] for i in ramp), abs=0)  # each ramp rises
        ids += ramp
    assert sorted(ids) == sorted(stats)  # every text exactly once
    with open(out / "order.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids and [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
    assert [float(r["key"]) for r in rows] == pytest.approx([key[i] for i in ids], rel=1e-12)
    assert summary["curriculum"]["key"] == "entropy_mean@a + -0.5·sqrt_varentropy_mean@a"
    assert "a saw-tooth of 2 ramps" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize(
    "patch, pattern",
    [
        ({"schedule": "sawtooth"}, r"sawtooth needs curriculum.cycles"),
        ({"cycles": 3}, r"curriculum.cycles is only used with schedule: sawtooth"),
        ({"key": {"sqrt_entropy": 1.0}}, r"'sqrt_entropy' is not a statistic;.*sqrt_STAT"),
    ],
)
def test_schedule_config_errors(patch, pattern):
    raw = {"models": [{"path": "x"}], "data": {"path": "y"}, "curriculum": patch}
    with pytest.raises(ConfigError, match=pattern):
        load_score_config(raw)
