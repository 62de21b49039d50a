"""``torchrun --nproc-per-node 2 -m isdelta.run``: two gloo processes give one process's report.

The tiny Llama of ``conftest`` (saved as an HF folder), 5 prompts in chunks of 2: rank 0 samples
chunks 0–1, rank 1 chunk 2 (an uneven split), each scores its rows, rank 0 merges and reports.

With p1 a second checkpoint every number of report.json equals the one-process run's to 1e-6.
With the in-process update (AdamW, gradients summed over the ranks) the update's own numbers do
too; the figures measured on p1 agree to the fp32 floor of the step: summing the gradient over
rows in other groups (two ranks, or one process with another ``engine.token_budget``) moves p1's
weights in their last bits, and per-prompt ΔH of 4 samples by up to ~1e-5 (measured: 1.1e-5 for
one process at token_budget 64 against the default, 9.6e-6 for two ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from isdelta.run import run
from isdelta.run.config import load_config
from isdelta.run.pipeline import progress
from tests.conftest import json_numbers

# answers that some of seed 3's samples of the tiny model end with (reinforce needs a reward
# that varies within a prompt; prompt 4 is rank 1's)
ROWS = [
    {"prompt": "1+1=", "answer": "6", "response": "2"},
    {"prompt": "2+3=", "answer": "5", "response": "5"},
    {"prompt": "hi", "answer": "1", "response": "hello"},
    {"prompt": "4-1=", "answer": "3", "response": "3"},
    {"prompt": "9:3=", "answer": "8", "response": "3"},
]
UPDATE_KEYS = ("n_tokens", "n_rows", "mean_reward", "active_prompt_fraction", "losses", "grad_norms")


def _config(tmp_path: Path, checkpoint: Path, **update) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "seed": 3,
        "model": {"path": str(checkpoint)},
        "data": {"path": str(data)},
        "update": {"loss": "reinforce", "reward": "answer_match", "optimizer": "adamw", "lr": 1e-3, **update},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "prompts_per_batch": 2},
        "estimator": {"weights": "psis"},
        "output": {"dir": str(tmp_path / "unused"), "plots": False},
    }


def _torchrun(cfg_path: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "isdelta.run", str(cfg_path), "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_report(one: dict, two: dict, atol: float = 1e-6) -> None:
    skip = ("timings", "versions", "device", "config", "plots")
    a, b = dict(json_numbers(one, skip)), dict(json_numbers(two, skip))
    assert a.keys() == b.keys()
    assert len(a) > 100  # estimates, per-prompt rows, the update's losses and norms
    bad = {k: (a[k], b[k]) for k in a if not np.isclose(a[k], b[k], rtol=1e-6, atol=atol, equal_nan=True)}
    assert not bad, bad


def _rank_parts(out: Path) -> None:
    """Each rank kept its own verified parts: rank 0 chunks 0–1, rank 1 chunk 2."""
    for rank, chunks in ((0, ["part-0000", "part-0001"]), (1, ["part-0002"])):
        folder = out / "ranks" / f"{rank}-of-2"
        assert sorted(p.stem for p in (folder / "samples").glob("*.pt")) == chunks
        assert (folder / "scores0.npz").exists() and (folder / "scores1.npz").exists()
        assert json.loads((folder / "parts.json").read_text())["parts"]


@pytest.fixture
def updated(tmp_path, checkpoint):
    """p1: the tiny Llama with every weight moved by 1% noise (seed 1), saved beside p0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.std() * torch.randn_like(p))
    path = tmp_path / "p1"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(path)
    return path


def _one_and_two(tmp_path: Path, raw: dict):
    """The run in this process into ``one``, and under torchrun (2 ranks) into ``two``:
    ``(one's report, two's report.json, torchrun's result, the config file)``."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    one = run(load_config(raw), tmp_path / "one")
    done = _torchrun(cfg_path, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return one, json.loads((tmp_path / "two" / "report.json").read_text()), done, cfg_path


def test_two_gloo_processes_give_the_one_process_report(tmp_path, checkpoint, updated, monkeypatch):
    raw = _config(tmp_path, checkpoint)
    del raw["update"]
    raw["updated"] = {"path": str(updated)}
    one, two, done, cfg_path = _one_and_two(tmp_path, raw)
    _assert_same_report(one, two)
    assert two["estimate"]["n_rows"] == 20 and two["estimate"]["n_prompts"] == 5
    assert "2 torchrun processes (gloo)" in two["device"]
    _rank_parts(tmp_path / "two")
    assert done.stdout.count("report: ") == 1 and done.stderr.count("[isdelta] sample ...") == 1  # rank 0 speaks

    # a rerun resumes every rank from its own parts: nothing is sampled or scored again
    parts = sorted((tmp_path / "two" / "ranks").rglob("*.[pn][tp]*"))  # samples/*.pt, scores*.npz
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = _torchrun(cfg_path, tmp_path / "two")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recomputed" not in again.stderr and len(parts) == 7
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    _assert_same_report(one, json.loads((tmp_path / "two" / "report.json").read_text()))
    # what Ctrl-C says was saved: the ranks' parts
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert progress(load_config(raw), tmp_path / "two") == [
        "p0's samples for 3 chunk(s) of 2 prompts (ranks/R-of-2/)",
        "scores0.npz of 2 of 2 ranks",
        "update.json of 2 of 2 ranks",  # {"kind": "checkpoint", ...}: p1's identity
        "scores1.npz of 2 of 2 ranks",
    ]


@pytest.mark.parametrize("loss", ["reinforce", "sft"])
def test_the_update_sums_every_ranks_gradient(tmp_path, checkpoint, loss):
    one, two, _, _ = _one_and_two(tmp_path, _config(tmp_path, checkpoint, loss=loss))
    u1, u2 = one["update"], two["update"]
    assert u2["n_rows"] == (20 if loss == "reinforce" else 5)
    if loss == "reinforce":
        assert 0 < u2["active_prompt_fraction"] < 1 and u2["mean_reward"] > 0  # prompt 4 (rank 1) counts
    for key in UPDATE_KEYS:
        if u1[key] is None:  # sft: no rewards
            assert u2[key] is None
            continue
        assert np.allclose(np.asarray(u1[key], float), np.asarray(u2[key], float), rtol=1e-6, atol=1e-9), key
    assert u2["param_change_norm"] == pytest.approx(u1["param_change_norm"], rel=1e-5)
    _assert_same_report(one, two, atol=5e-5)  # the fp32 floor of the step (module doc)
    _rank_parts(tmp_path / "two")


def test_a_config_torchrun_cannot_share_fails_once_on_every_rank(tmp_path, checkpoint):
    raw = _config(tmp_path, checkpoint)
    raw["sampling"]["prompts_per_batch"] = 4  # 2 chunks for 3 ranks
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    done = _torchrun(cfg_path, tmp_path / "out", nproc=3)
    assert done.returncode != 0
    assert done.stderr.count("torchrun with 3 processes: the data's 5 prompts make 2 chunk(s)") == 1, done.stderr
    assert "error (rank 0 of 3): torchrun with 3 processes" in done.stderr
    assert not (tmp_path / "out" / "ranks").exists()  # nothing was written
