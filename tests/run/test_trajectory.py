"""Checkpoint trajectories (``checkpoints: [...]``): direct estimates up to the IS horizon, chained
steps past it, against exact entropies enumerated on a tiny model.

The series: a tiny Llama p0 (V = 96, the char tokenizer) and checkpoints θ_k = θ0 + k·a·d along
one random direction d, saved as HF folders. Completions are at most 2 tokens, so H(p_k) is exact
by the chain rule over all 96 + 96·95 continuations: H = H(x1) + Σ_{x1 ≠ stop} p(x1) H(x2 | x1),
E[L] = 2 − p(stop), computed in float64 with full logits (independent of the engine).
"""

from __future__ import annotations

import csv
import json
import math
import types

import numpy as np
import pytest

from isdelta.program import ConfigError
from isdelta.run import run
from isdelta.run.config import config_hash, load_config
from isdelta.run.data import RunError

K, STEP, G = 5, 0.016, 32
PROMPTS = ["1+1=", "2+3=", "hi"]
LEVEL = 0.99  # one CI per row and per unit (≈ 20 in all): 99% keeps a seeded false alarm rare


@pytest.fixture(scope="module")
def threads():
    """Tiny models: intra-op threads cost more than they save (as conftest's one_thread)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def series(tmp_path_factory, char_tok, tiny_llama, threads):
    """The base and K checkpoints along one direction, saved as HF folders; returns their paths."""
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("series")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama.config)  # the tiny architecture, fresh weights
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        _common_stops(model, char_tok)
    gen = torch.Generator().manual_seed(1)
    d = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = []
    for k in range(K + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta0[n] + k * STEP * d[n])
        path = root / ("base" if k == 0 else f"step-{k}")
        model.save_pretrained(path)
        char_tok.save_pretrained(path)
        paths.append(path)
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root, paths


def _common_stops(model, tok) -> None:
    """Make the stop token common (p ≈ 0.25 on average, ≥ 0.005 everywhere): at 1% a stopped row
    is a rare event that carries ~4 nats, and no sample of 32 rows per prompt sees it reliably."""
    import torch

    from isdelta.engine.sampling import encode_prompts

    hidden = []
    for prompt in PROMPTS:
        (ids,), _ = encode_prompts(tok, [[{"role": "user", "content": prompt}]])
        rows = torch.tensor([list(ids) + [t] for t in range(model.config.vocab_size)])  # [V, T + 1]
        hidden.append(model.model(rows).last_hidden_state[:, -2:].reshape(-1, model.config.hidden_size))
    h = torch.cat(hidden)  # [3·V·2, D]: every context that scores x1 or x2
    w = torch.linalg.lstsq(h, torch.ones(len(h), 1)).solution[:, 0]  # h·w ≈ 1 in every context
    model.lm_head.weight[tok.eos_token_id] = 4.0 * w


def make_cfg(root, paths, out="out", **over):
    raw = {
        "model": {"path": str(paths[0])},
        "data": {"path": str(root / "data.jsonl")},
        "checkpoints": [str(p) for p in paths[1:]],
        "sampling": {"num_samples": G, "max_new_tokens": 2, "prompts_per_batch": 3},
        "estimator": {"weights": "none", "level": LEVEL},
        "output": {"dir": str(root / out), "plots": True},
    }
    raw.update(over)
    return load_config(raw)


def exact_entropy(path, tok) -> tuple[float, float]:
    """(H per sequence, H per token) of the checkpoint at ``path`` with equal prompt mass."""
    import torch
    from transformers import LlamaForCausalLM

    from isdelta.engine.sampling import encode_prompts

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    stop, hs, ls = tok.eos_token_id, [], []
    for prompt in PROMPTS:
        (ids,), _ = encode_prompts(tok, [[{"role": "user", "content": prompt}]])
        with torch.no_grad():
            logp1 = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)  # [V]
            words = [t for t in range(logp1.numel()) if t != stop]
            rows = torch.tensor([list(ids) + [t] for t in words])  # [V − 1, T + 1]
            logp2 = torch.log_softmax(model(rows).logits[:, -1], -1)  # [V − 1, V]
        h1 = -(logp1.exp() * logp1).sum()
        h2 = -(logp2.exp() * logp2).sum(-1)  # [V − 1]
        hs.append(float(h1 + (logp1[words].exp() * h2).sum()))
        ls.append(float(2 - logp1[stop].exp()))
    return float(np.mean(hs)), float(np.mean(hs) / np.mean(ls))


@pytest.fixture(scope="module")
def result(series):
    root, paths = series
    report = run(make_cfg(root, paths))
    return root, paths, report


def test_chained_trajectory_matches_exact_entropies(result, char_tok):
    """Every valid row's CI (direct and chained) covers the enumerated H(p_k) and H(p_k) − H(p0),
    per sequence and per token; the series reaches the horizon inside it, so both kinds appear."""
    root, paths, report = result
    rows = report["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "base" and "direct" in kinds and "chained" in kinds
    exact = [exact_entropy(p, char_tok) for p in paths]
    for r in rows:
        assert r["valid"], r["reason"]
        h, h_tok = exact[r["k"]]
        for key, truth in (("h", h), ("h_tok", h_tok), ("delta", h - exact[0][0]), ("delta_tok", h_tok - exact[0][1])):
            if r["kind"] == "base" and key.startswith("delta"):
                continue
            assert r[f"{key}_ci_low"] <= truth <= r[f"{key}_ci_high"], (r["k"], key, r[key], truth)
    # the CSV holds the same rows
    with open(root / "out" / "trajectory.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in csv_rows] == list(range(K + 1))
    assert [r["kind"] for r in csv_rows] == kinds
    assert float(csv_rows[-1]["h"]) == pytest.approx(rows[-1]["h"])
    assert (root / "out" / "trajectory.png").stat().st_size > 0
    assert "◀ horizon" in (root / "out" / "trajectory.md").read_text()


def test_horizon_is_the_first_invalid_direct_estimate_and_the_chain_sums_steps(result):
    """Rows before the horizon are direct and valid; from it on each row is its predecessor plus
    the step on the predecessor's own samples, SE by root sum of squares."""
    root, paths, report = result
    h, rows, segs = report["horizon"], report["rows"], report["segments"]
    assert h is not None and 1 <= h <= K
    assert all(r["kind"] == "direct" for r in rows[1:h]) and all(r["kind"] == "chained" for r in rows[h:])
    assert rows[h]["horizon"] and sum(r["horizon"] for r in rows) == 1
    direct = {s["to"]: s for s in segs if s["from"] == "base"}
    assert not direct[rows[h]["checkpoint"]]["headline"]["valid"]  # the horizon's direct estimate
    assert all(direct[r["checkpoint"]]["headline"]["valid"] for r in rows[1:h])
    for r in rows[h:]:
        prev = rows[r["k"] - 1]
        assert r["samples_from"] == prev["checkpoint"]
        assert r["delta"] == pytest.approx(prev["delta"] + r["step_delta"], abs=1e-12)
        assert r["delta_se"] == pytest.approx(math.hypot(prev["delta_se"], r["step_delta_se"]), rel=1e-12)
        assert r["h_se"] == pytest.approx(math.hypot(prev["h_se"], r["step_delta_se"]), rel=1e-12)
    # each checkpoint past the anchor sampled with its own seed: independent sample sets
    own = sorted((root / "out" / "checkpoints").glob("*/samples/part-0000.pt"))
    assert len(own) == K - h + (h > 1)


def test_a_second_run_reuses_every_saved_part(result, monkeypatch):
    """Rerunning the same config samples and scores nothing; a deleted part is recomputed alone."""
    root, paths, report = result
    import isdelta.engine.logprob as logprob
    import isdelta.engine.sampling as sampling

    def no_sampling(*a, **k):
        raise AssertionError("the rerun sampled again")

    calls = []
    score = logprob.LogProbEngine.score
    monkeypatch.setattr(sampling, "sample", no_sampling)
    monkeypatch.setattr(logprob.LogProbEngine, "score", lambda self, *a, **k: calls.append(1) or score(self, *a, **k))
    again = run(make_cfg(root, paths))
    assert calls == [] and again["rows"] == report["rows"]
    next(iter(sorted((root / "out" / "checkpoints").glob("*/next.npz")))).unlink()
    third = run(make_cfg(root, paths))
    assert calls == [1] and third["rows"] == report["rows"]


def test_chain_stops_at_a_step_that_is_not_valid():
    """A chained step the headline policy rejects ends the chain: that row and every later one are
    not valid, with the reason, and carry no number."""
    from isdelta.estimators import Estimate, Headline
    from isdelta.run.trajectory import Segment, chain

    def est(v, se=0.1):
        return Estimate.normal(v, se, 0.95, 1.96)

    res = types.SimpleNamespace(h0=est(5.0), h0_rb=None, h0_tok=est(1.0), h0_tok_rb=None)

    def seg(a, b, valid, dv=0.5):
        d = Headline(valid, "cv" if valid else "none", "", reason=None if valid else "ESS too small")
        if valid:
            d = Headline(True, "cv", "", delta=est(dv), delta_tok=est(dv / 5), h0=est(5.0), h1=est(5 + dv * b),
                         h0_tok=est(1.0), h1_tok=est(1 + dv * b / 5))  # fmt: skip
        return Segment(a, b, res, d)

    direct = [seg(0, 1, True), seg(0, 2, False)]
    pts = chain(direct, [seg(1, 2, True), seg(2, 3, False), seg(3, 4, True)], 0.95)
    assert [(p.k, p.kind, p.valid) for p in pts] == [
        (0, "base", True),
        (1, "direct", True),
        (2, "chained", True),
        (3, "chained", False),
        (4, "chained", False),
    ]
    assert pts[2].delta.value == pytest.approx(1.0) and pts[2].delta.se == pytest.approx(math.hypot(0.1, 0.1))
    assert "step 2→3 (not valid): ESS too small" in pts[3].reason and pts[3].h is None
    assert "chain broke at step 2→3" in pts[4].reason and pts[4].delta is None
    with pytest.raises(ValueError, match="does not follow"):
        chain(direct, [seg(2, 3, True)], 0.95)


BASE = {"model": {"path": "smollm2-135m-instruct"}, "data": {"path": "builtin:math"}}


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ({"checkpoints": ["a"], "update": {"loss": "sft"}}, r"exactly one of .*got update and checkpoints"),
        ({"checkpoints": ["a"], "updated": {"path": "b"}}, r"got updated and checkpoints"),
        ({}, r"exactly one of `updated`.*`checkpoints`"),
        ({"checkpoints": []}, r"checkpoints: the list is empty"),
        ({"checkpoints": ["a", "b", "a"]}, r"checkpoints\.2: 'a' repeats checkpoints\.0"),
        ({"checkpoints": ["a", ""]}, r"checkpoints\.1: .*at least 1 character"),
        ({"checkpoints": ["a"], "probe": {}}, r"`probe` compares two models"),
        ({"checkpoints": ["a"], "tokens": {}}, r"`tokens` compares two models"),
    ],
)
def test_config_errors_name_the_field(extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({**BASE, **extra})


def test_hash_of_configs_without_checkpoints_is_unchanged():
    import hashlib

    plain = load_config({**BASE, "update": {"loss": "sft"}})
    old = plain.model_dump(mode="json", exclude={"output", "tokens", "checkpoints"})
    old["engine"].pop("fused", None)
    old["sampling"].pop("backend", None)
    assert config_hash(plain) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    a, b = (load_config({**BASE, "checkpoints": c}) for c in (["x", "y"], ["x", "z"]))
    assert config_hash(a) != config_hash(b)


def test_a_missing_checkpoint_is_refused_before_any_work(series):
    root, paths = series
    cfg = make_cfg(root, paths, out="missing", checkpoints=[str(paths[1]), str(root / "nowhere")])
    with pytest.raises(ConfigError, match=r"checkpoints\.1\.path: no checkpoint at .*make_checkpoints"):
        run(cfg)
    assert not (root / "missing").exists()


def test_the_demo_config_without_its_checkpoints_names_the_command_that_makes_them(tmp_path):
    """configs/trajectory_demo.yaml run as given (issue 30, kind 16): one line naming
    make_checkpoints and the make target; exit 2 before any model loads."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-m", "isdelta.run", str(repo / "configs" / "trajectory_demo.yaml"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # runs/trajectory_ckpts/… do not exist here
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = res.stderr[res.stderr.index("error: ") :]
    assert "checkpoints.0.path: no checkpoint at runs/trajectory_ckpts/step-1" in line
    assert "python -m isdelta.run.make_checkpoints" in line and "make trajectory-demo" in line
    assert "trajectory-demo:" in (repo / "Makefile").read_text()


def test_a_checkpoint_whose_context_the_prompts_overrun_is_refused_before_any_work(series, tmp_path):
    """Each checkpoint's context is checked as model's is (issue 30, kind 5)."""
    import shutil

    root, paths = series
    short = tmp_path / "short"
    shutil.copytree(paths[1], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(config))
    cfg = make_cfg(root, paths, out=str(tmp_path / "out"), checkpoints=[str(paths[2]), str(short)])
    with pytest.raises(RunError, match=r"do not fit checkpoints\.1's context of 8 positions"):
        run(cfg)
    assert not (tmp_path / "out" / "samples").exists()


def test_make_checkpoints_trains_saves_and_keeps_what_a_recipe_made(series, tmp_path, capsys):
    """The demo's checkpoint maker: update steps with a growing lr (the run's update code), a
    saved recipe per checkpoint; a rerun keeps them; REINFORCE samples the current model with the
    run's sampler and, on rewards without variance, stops with the run's one-line exit 3; a config
    without ``checkpoints`` is one line and exit 2."""
    import yaml

    from isdelta.run.make_checkpoints import main

    root, paths = series
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "7", "response": "ok"}) + "\n" for p in PROMPTS))
    cfg = {
        "model": {"path": str(paths[0])},
        "data": {"path": str(data)},
        "checkpoints": [str(tmp_path / "c1"), str(tmp_path / "c2")],
        "sampling": {"num_samples": 8, "max_new_tokens": 2, "prompts_per_batch": 3},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [str(path), "--loss", "sft", "--lr", "0.05", "--growth", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    recipes = [json.loads((tmp_path / c / "isdelta_checkpoint.json").read_text()) for c in ("c1", "c2")]
    assert [r["lr"] for r in recipes] == [0.05, 0.1] and recipes[1]["info"]["param_change_norm"] > 0
    stamp = (tmp_path / "c2" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0 and "already made by this recipe" in capsys.readouterr().out
    assert (tmp_path / "c2" / "model.safetensors").stat().st_mtime_ns == stamp
    cfg["checkpoints"] = [str(tmp_path / "r1")]
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--loss", "reinforce", "--lr", "0.05"]) == 3  # no answer "7" is ever sampled
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the update did not change the model") and not (tmp_path / "r1").exists()
    del cfg["checkpoints"]
    cfg["updated"] = {"path": str(paths[1])}
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "checkpoints" in err[0]


def test_a_checkpoint_rewritten_in_place_is_rescored(series, tmp_path, capsys):
    """A checkpoint overwritten with other weights of the same size and its old mtime (a restore,
    ``cp -p``): its scores are recomputed, not reused (issue 30, kind 2)."""
    import os
    import shutil

    root, paths = series
    copies = []
    for p in paths[:3]:
        shutil.copytree(p, tmp_path / p.name)
        copies.append(tmp_path / p.name)
    cfg = make_cfg(root, copies, out=str(tmp_path / "out"))
    first = run(cfg)
    target = copies[1] / "model.safetensors"
    st = target.stat()
    shutil.copyfile(copies[2] / "model.safetensors", target)  # checkpoint 1 now holds checkpoint 2's weights
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    again = run(cfg)
    assert "direct.npz was computed from other inputs" in capsys.readouterr().err
    assert again["rows"][1]["delta"] == pytest.approx(first["rows"][2]["delta"])


def test_a_checkpoint_whose_scores_the_estimators_refuse_is_the_horizon_not_an_error(series, tmp_path):
    """top-k 2: far checkpoints keep other tokens than the base, so they give some of its samples
    probability 0 (log p = −inf) and the estimators refuse those scores. Every part is saved by
    then: the segment is not valid with the reason (the IS horizon), never an error every rerun
    repeats (issue 30, kind 9)."""
    root, paths = series
    sampling = {"num_samples": 8, "max_new_tokens": 2, "prompts_per_batch": 3, "top_k": 2}
    cfg = make_cfg(root, paths, out=str(tmp_path / "out"), sampling=sampling)
    report = run(cfg)
    refused = [r for r in report["rows"] if "estimators refused" in (r["reason"] or "")]
    assert refused and not refused[0]["valid"] and "-inf" in refused[0]["reason"]
    assert (tmp_path / "out" / "trajectory.md").exists()
    assert run(cfg)["rows"] == report["rows"]  # the rerun reports from the saved parts the same way
