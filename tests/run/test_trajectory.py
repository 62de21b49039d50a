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
        assert r["valid"] and r["valid_tok"], r["reason"]
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
    # the own-sample check ran wherever a checkpoint sampled itself past the base (the sources of
    # the chained steps), and nowhere else
    h = report["horizon"]
    sampled = set(range(max(h - 1, 1), K))
    assert {int(r["k"]) for r in csv_rows if r["own_z"] != ""} == sampled
    assert {int(r["k"]) for r in csv_rows if r["own_z_tok"] != ""} == sampled
    assert all(r["valid_tok"] == "True" for r in csv_rows)
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


# --------------------------------------------------------------------------- chain() on hand-built segments
# A series with known entropies: H(k) = 5 + 0.5·k per sequence, 1 + 0.1·k per token, every
# estimate ± 0.1; a segment's own-sample means are its source's H unless a test moves them.
def _est(v, se=0.1):
    from isdelta.estimators import Estimate

    return Estimate.normal(v, se, 0.95, 1.96)


def _seg(a, b, level="both", own=None, reason="ESS too small"):
    """The segment a → b, valid at ``level`` ("both", "tok": per token only, "none"), with the
    source's own-sample means ``own`` = (H, H per token) (default: the true ones)."""
    from isdelta.estimators import Headline
    from isdelta.run.trajectory import Segment

    h, h_tok = (lambda k: 5 + 0.5 * k), (lambda k: 1 + 0.1 * k)
    tok = dict(delta_tok=_est(h_tok(b) - h_tok(a)), h0_tok=_est(h_tok(a)), h1_tok=_est(h_tok(b)))
    if level == "both":
        d = Headline(True, "cv", "", delta=_est(h(b) - h(a)), h0=_est(h(a)), h1=_est(h(b)), **tok)
    elif level == "tok":
        d = Headline(False, "cv", "", reason=reason, valid_tok=True, **tok)
    else:
        d = Headline(False, "none", "", reason=reason)
    o_h, o_tok = own or (h(a), h_tok(a))
    res = types.SimpleNamespace(h0=_est(o_h), h0_rb=None, h0_tok=_est(o_tok), h0_tok_rb=None)
    res.__dict__.update(ess=29.0, ess_frac=0.9, khat=0.2, kl=0.01)  # the report's diagnostics
    return Segment(a, b, res, d)


def _rows(pts):
    return [(p.k, p.kind, p.valid, p.valid_tok) for p in pts]


def test_chain_stops_at_a_step_that_is_not_valid():
    """A chained step the headline policy rejects at both levels ends the chain: that row and
    every later one are not valid, with the reason, and carry no number."""
    from isdelta.run.trajectory import chain

    direct = [_seg(0, 1), _seg(0, 2, "none")]
    pts = chain(direct, [_seg(1, 2), _seg(2, 3, "none"), _seg(3, 4)], 0.95)
    assert _rows(pts) == [
        (0, "base", True, True),
        (1, "direct", True, True),
        (2, "chained", True, True),
        (3, "chained", False, False),
        (4, "chained", False, False),
    ]
    assert pts[2].delta.value == pytest.approx(1.0) and pts[2].delta.se == pytest.approx(math.hypot(0.1, 0.1))
    assert pts[3].reason == "step 2→3 (not valid): ESS too small" and pts[3].h is None and pts[3].h_tok is None
    assert "chain broke at step 2→3" in pts[4].reason and pts[4].delta is None and pts[4].delta_tok is None
    with pytest.raises(ValueError, match="does not follow"):
        chain(direct, [_seg(2, 3)], 0.95)


def test_a_step_valid_per_token_only_breaks_the_sequence_chain_and_keeps_the_token_chain():
    """(a) Step 2→3 holds per token only: rows 3 and 4 lose H per sequence (the reason names the
    level) and keep H per token, the sum of the steps: values add, SEs in quadrature."""
    from isdelta.run.trajectory import chain

    pts = chain([_seg(0, 1), _seg(0, 2, "none")], [_seg(1, 2), _seg(2, 3, "tok", reason="gap"), _seg(3, 4)], 0.95)
    assert _rows(pts)[2:] == [(2, "chained", True, True), (3, "chained", False, True), (4, "chained", False, True)]
    assert pts[3].reason == "per sequence: step 2→3 (not valid): gap"
    assert pts[4].reason == "per sequence: the chain broke at step 2→3 (not valid), so this level is unknown"
    for p in pts[3:]:
        assert p.h is None and p.delta is None
        assert p.h_tok.value == pytest.approx(1 + 0.1 * p.k) and p.delta_tok.value == pytest.approx(0.1 * p.k)
        assert p.h_tok.se == pytest.approx(0.1 * math.sqrt(p.k))  # direct row 1, then k − 1 steps


def test_a_horizon_the_base_reaches_per_token_keeps_its_direct_value_there():
    """The horizon is where the per-sequence level fails; the direct segment's per-token value at
    that row is reported (kind_tok "direct", its own SE) and the per-token chain starts there."""
    from isdelta.run.trajectory import chain, horizon

    direct = [_seg(0, 1), _seg(0, 2, "tok", reason="gap")]
    assert horizon(direct) == 2
    pts = chain(direct, [_seg(1, 2), _seg(2, 3)], 0.95)
    assert _rows(pts) == [(0, "base", True, True), (1, "direct", True, True), (2, "chained", True, True), (3, "chained", True, True)]  # fmt: skip
    assert [p.kind_tok for p in pts] == ["base", "direct", "direct", "chained"]
    assert pts[2].h.se == pytest.approx(math.hypot(0.1, 0.1))  # per sequence: anchor 1 + step 1→2
    assert pts[2].h_tok.se == pytest.approx(0.1) and pts[2].h_tok.value == pytest.approx(1.2)  # direct
    assert pts[3].h_tok.se == pytest.approx(math.hypot(0.1, 0.1)) and pts[3].delta_tok.value == pytest.approx(0.3)
    alone = chain(direct, [], 0.95)  # no chained step: the horizon's row is direct, per token only
    assert _rows(alone)[2] == (2, "direct", False, True) and alone[2].h is None
    assert alone[2].h_tok.value == pytest.approx(1.2) and "gap" in alone[2].reason


def test_an_anchor_that_disagrees_with_its_own_samples_per_sequence_loses_that_level():
    """(b) Checkpoint 1's own samples say H = 6.0 ± 0.1 and the base's samples weighted to it
    5.5 ± 0.1: z = 0.5 / √0.02 = 3.54 > Φ⁻¹(1 − 0.05/4) = 2.24. Row 1 and the chained rows built on
    it lose the per-sequence level, with both numbers, z and the threshold; per token (own samples
    agree) every row stays valid."""
    from isdelta.run.trajectory import chain

    steps = [_seg(1, 2, own=(6.0, 1.1)), _seg(2, 3)]
    pts = chain([_seg(0, 1), _seg(0, 2, "none")], steps, 0.95)
    assert _rows(pts) == [(0, "base", True, True), (1, "direct", False, True), (2, "chained", False, True), (3, "chained", False, True)]  # fmt: skip
    assert pts[1].own_z == pytest.approx(0.5 / math.sqrt(0.02)) and pts[1].own_z_tok == pytest.approx(0.0)
    assert pts[1].reason == (
        "per sequence: H per sequence 5.5 ± 0.1 from the base's samples disagrees with checkpoint 1's own samples "
        "6 ± 0.1 (z = 3.54 > 2.24)"
    )
    assert pts[1].h is None and pts[1].h_tok.value == pytest.approx(1.1)
    for p in pts[2:]:
        assert "the anchor's H per sequence disagreed with its own samples" in p.reason and p.h is None
        assert p.h_tok.value == pytest.approx(1 + 0.1 * p.k)
    assert pts[0].own_z is None and pts[3].own is None  # the base is its own mean; k = 3 did not sample


def test_own_samples_within_the_threshold_leave_the_row_valid():
    """(c) Own samples 0.3 above the weighted value: z = 0.3 / √0.02 = 2.12 ≤ 2.24, valid."""
    from isdelta.run.trajectory import chain

    pts = chain([_seg(0, 1), _seg(0, 2, "none")], [_seg(1, 2, own=(5.8, 1.1)), _seg(2, 3)], 0.95)
    assert all(p.valid and p.valid_tok for p in pts) and pts[1].reason is None
    assert pts[1].own_z == pytest.approx(0.3 / math.sqrt(0.02)) and pts[2].own_z == pytest.approx(0.0)


def test_a_chained_row_that_disagrees_per_token_ends_that_chain_and_keeps_the_other():
    """(d) Checkpoint 2 (chained) samples H per token 1.6 against the chain's 1.2 ± 0.14: rows 2–4
    lose the per-token level, their per-sequence level goes on (the sum of the steps)."""
    from isdelta.run.trajectory import chain

    steps = [_seg(1, 2), _seg(2, 3, own=(6.0, 1.6)), _seg(3, 4)]
    pts = chain([_seg(0, 1), _seg(0, 2, "none")], steps, 0.95)
    assert _rows(pts)[2:] == [(2, "chained", True, False), (3, "chained", True, False), (4, "chained", True, False)]
    assert "disagrees with checkpoint 2's own samples 1.6 ± 0.1 (z = 2.31 > 2.24)" in pts[2].reason
    assert pts[2].reason.startswith("per token: H per token 1.2 ± 0.14 from the chain")
    for p in pts[3:]:
        assert p.reason == (
            "per token: the chain broke at k = 2 (its H per token disagreed with its own samples), so this level is unknown"
        )
        assert (
            p.h_tok is None and p.h.value == pytest.approx(5 + 0.5 * p.k) and p.delta.value == pytest.approx(0.5 * p.k)
        )


def test_own_sample_threshold_is_bonferroni_over_the_two_levels():
    """Each level's two-sided tail at the threshold is (1 − level)/2, so a row's ≤ 1 − level."""
    from scipy.stats import norm

    from isdelta.run.trajectory import own_sample_z

    assert own_sample_z(0.95) == pytest.approx(2.2414, abs=1e-4)
    for level in (0.9, 0.95, 0.99):
        assert 2 * norm.sf(own_sample_z(level)) == pytest.approx((1 - level) / 2)
    with pytest.raises(ValueError, match="level must lie in"):
        own_sample_z(95)


def test_the_report_marks_each_level(tmp_path):
    """trajectory.csv's rows carry both verdicts and the z values; the table says which level
    failed; the plot draws with one level missing on some rows."""
    from isdelta.run.trajectory import chain
    from isdelta.run.trajectory_report import plot_trajectory, point_rows, trajectory_markdown

    pts = chain([_seg(0, 1), _seg(0, 2, "none")], [_seg(1, 2, own=(6.0, 1.1)), _seg(2, 3)], 0.95)
    cks = [types.SimpleNamespace(name=f"c{k}", model=types.SimpleNamespace(path=f"p{k}")) for k in range(4)]
    rows = point_rows(pts, cks, 2)
    assert [(r["valid"], r["valid_tok"]) for r in rows] == [(True, True), (False, True), (False, True), (False, True)]
    assert rows[1]["own_z"] == pytest.approx(3.5355, abs=1e-4) and rows[1]["h_own"] == 6.0
    assert rows[3]["own_z"] is None and rows[0]["own_z"] is None and rows[2]["own_z_tok"] == pytest.approx(0.0)
    md = "\n".join(trajectory_markdown(rows, 2, 0.95, "ESS too small"))
    assert "| **no** / yes |" in md and "- k = 1: not valid per sequence: H per sequence 5.5" in md
    assert "z > 2.24" in md and "| 3.54 / 0.00 |" in md
    plot_trajectory(tmp_path / "t.png", rows, 2)
    assert (tmp_path / "t.png").stat().st_size > 0


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
