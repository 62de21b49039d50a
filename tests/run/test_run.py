"""`python -m isdelta.run` end to end on a tiny random model with a char-level tokenizer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import isdelta.run.pipeline as pipeline
from isdelta.run import RunError, main, run
from isdelta.run.config import load_config

ROWS = [
    {"prompt": "1+1=", "answer": "2", "response": "2"},
    {"prompt": "2+3=", "answer": "5", "response": "5"},
    {"prompt": "hi", "answer": "0", "response": "hello"},
]


def make_cfg(tmp_path, checkpoint, **sections):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    raw = {
        "seed": 0,
        "model": {"path": str(checkpoint)},
        "data": {"path": str(data)},
        "update": {"loss": "sft", "lr": 0.5, "steps": 1},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "prompts_per_batch": 2},
        "estimator": {"weights": "none"},
        "output": {"dir": str(tmp_path / "out"), "plots": True, "n_trace_samples": 2},
    }
    for k, v in sections.items():
        raw[k] = v if v is None or not isinstance(v, dict) else {**raw.get(k, {}), **v}
    return load_config({k: v for k, v in raw.items() if v is not None})


def test_run_writes_a_complete_report(tmp_path, checkpoint):
    cfg = make_cfg(tmp_path, checkpoint, update={"lr": 0.001})  # a step the headline policy reads with cv
    report = run(cfg)
    out = tmp_path / "out"
    for name in (
        "report.json",
        "sequences.csv",
        "summary.md",
        "config.yaml",
        "weights.png",
        "per_prompt.png",
        "entropy_hist.png",
        "token_entropy.png",
        "scores0.npz",
        "scores1.npz",
    ):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    est = rep["estimate"]
    assert est["n_rows"] == 12 and est["n_prompts"] == 3
    d = est["delta"]
    assert d["ci_low"] <= d["value"] <= d["ci_high"] and d["value_bits"] == pytest.approx(d["value"] / np.log(2))
    assert rep["update"]["kind"] == "update" and rep["update"]["param_change_norm"] > 0
    assert report["config_hash"] == (out / "config_hash").read_text().strip()
    with open(out / "sequences.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["prompt_id"] for r in rows} == {"0", "1", "2"}
    # the per-prompt weights sum to one, and the CSV's S0/S1 agree with the saved scores
    w = np.array([float(r["weight"]) for r in rows])
    g = np.array([int(r["prompt_id"]) for r in rows])
    assert np.allclose(np.bincount(g, weights=w), 1.0)
    s0 = dict(np.load(out / "scores0.npz"))
    assert np.allclose([float(r["S0"]) for r in rows], s0["logp"], atol=1e-5)
    summary = (out / "summary.md").read_text()
    assert "ΔH per sequence" in summary and "ESS" in summary and "Per-decision estimates" in summary
    tok = rep["estimate_tokens"]
    assert tok["method"] == "cv" and tok["n_rows"] == 12 and tok["delta"]["se"] > 0
    # the headline is the per-decision estimate (its checks hold); sequence-level SNIS beside it
    head = rep["headline"]
    assert head["valid"] and head["method"] == "cv" and head["delta"] == tok["delta"]
    assert head["delta_snis"] == rep["estimate"]["delta"] and "prefix ESS / G" in head["why"]
    first = summary.split("\n")[4]
    assert first.startswith("**ΔH = ") and "— cv (" in first


def test_an_unreadable_step_is_reported_as_not_valid(tmp_path, checkpoint, capsys):
    """SFT at lr 0.5 moves p1's mass where p0's 4 samples per prompt never went: no number is
    reported as the headline; the failed checks and what would help are."""
    report = run(make_cfg(tmp_path, checkpoint))
    head = report["headline"]
    assert not head["valid"] and head["method"] == "none" and head["delta"] is None
    assert "mean ratio p1/p0" in head["reason"] and "samples per prompt" in head["advice"]
    first = (tmp_path / "out" / "summary.md").read_text().split("\n")[4]
    assert first.startswith("**ΔH: not valid on these samples — ")
    assert "ΔH: not valid" in capsys.readouterr().out


def test_scoring_p0_twice_gives_zero_delta_exactly(tmp_path, checkpoint):
    """p1 = a second checkpoint identical to p0: ΔH = 0 exactly, ESS = N."""
    cfg = make_cfg(tmp_path, checkpoint, update=None, updated={"path": str(checkpoint)})
    report = run(cfg)
    rep = report["estimate"]
    assert rep["delta"]["value"] == 0.0 and rep["ess"] == pytest.approx(12.0)
    assert report["estimate_tokens"]["delta"]["value"] == 0.0


def test_interrupted_run_resumes_without_resampling(tmp_path, checkpoint, monkeypatch):
    cfg = make_cfg(tmp_path, checkpoint)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the run dies after sampling and scoring p0

    monkeypatch.setattr(pipeline, "make_p1", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    out = tmp_path / "out"
    parts = sorted((out / "samples").glob("part-*.pt"))
    assert len(parts) == 2 and (out / "scores0.npz").exists() and not (out / "scores1.npz").exists()
    monkeypatch.undo()

    import isdelta.engine.sampling as sampling

    def no_sampling(*a, **k):
        raise AssertionError("resumed run sampled again")

    monkeypatch.setattr(sampling, "sample", no_sampling)
    report = run(cfg)
    assert report["estimate"]["n_rows"] == 12


def test_a_changed_config_refuses_the_old_folder(tmp_path, checkpoint):
    run(make_cfg(tmp_path, checkpoint))
    with pytest.raises(RunError, match="different config"):
        run(make_cfg(tmp_path, checkpoint, seed=1))


def test_an_update_that_cannot_move_is_reported_not_measured(tmp_path, checkpoint, capsys):
    # reinforce with rewards that are all 0 (no completion of a random model is right)
    cfg = make_cfg(tmp_path, checkpoint, update={"loss": "reinforce", "reward": "boxed_match"})
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main([str(path)]) == 3
    assert "did not change the model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {path: x}\ndata: {path: y}\nupdate: {lr: -1}\n")
    assert main([str(path)]) == 2
    assert "update.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_config_end_to_end_on_smollm2(tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", [f"output.dir={tmp_path}"])
    report = run(cfg)
    est = report["estimate"]
    assert est["n_rows"] == 64 and est["n_prompts"] == 8
    for key in ("delta", "delta_tok", "delta_rb", "delta1"):
        e = est[key]
        assert all(np.isfinite([e["value"], e["se"], e["ci_low"], e["ci_high"]])), key
    assert 0 < est["ess"] <= 64 and report["update"]["param_change_norm"] > 0
    assert len(report["plots"]) == 4 and all((tmp_path / p).stat().st_size > 5000 for p in report["plots"])


def test_excluding_eos_changes_lengths_not_weights(tmp_path, checkpoint):
    with_eos = run(make_cfg(tmp_path, checkpoint))["estimate"]
    cfg = make_cfg(tmp_path, checkpoint, engine={"include_eos": False}, output={"dir": str(tmp_path / "out2")})
    no_eos = run(cfg)["estimate"]
    s0 = dict(np.load(tmp_path / "out" / "scores0.npz"))
    assert no_eos["include"] == "no_eos"
    # the same samples; the mean length drops by the fraction of rows ending with a stop token
    n_stop = s0["stopped"].reshape(3, 4).mean(1).mean()
    assert no_eos["mean_length"] == pytest.approx(with_eos["mean_length"] - n_stop)
    assert no_eos["ess"] == pytest.approx(with_eos["ess"])  # weights: full-sequence ratio both times


def test_run_with_probe_sweep(tmp_path, checkpoint):
    cfg = make_cfg(
        tmp_path, checkpoint, update={"lr": 0.05}, probe={"gradient": True, "sweep": [0.5, 1.0], "per_token": False}
    )
    report = run(cfg)
    out = tmp_path / "out"
    assert (out / "probe.json").exists() and (out / "probe_sweep.png").exists()
    probe = report["probe"]
    assert probe is not None and len(probe["rows"]) == 2
    assert "Probe: first-order prediction" in (out / "summary.md").read_text()
    # the sweep at α = 1 is the update itself: its ΔH equals the run's ΔH
    at1 = json.loads((out / "probe.json").read_text())
    assert at1 == json.loads(json.dumps(probe))
