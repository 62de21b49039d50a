"""Intervals over carriers, strata and the probing table of the token stage.

Compared against: the known mean of a simulated clustered population (coverage at the nominal
rate over seeded repetitions, and the position-level bootstrap's under-coverage on the same
data), the closed-form bootstrap variance of a mean, scipy's binomial test, naive per-group
loops, and hand-built tables whose answers are known.
"""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from isdelta.engine import Rollouts
from isdelta.tokens import TokenComparison, TokenOptions, compare_tokens, run_tokens, summarise
from isdelta.tokens.bootstrap import resample_counts, sign_test, unit_sums, weighted_ci
from isdelta.tokens.report import markdown_lines
from isdelta.tokens.significance import STATS, probing_rows
from isdelta.tokens.strata import add_strata, correctness, length_bins
from isdelta.tokens.token_texts import by_token, token_text_summary


# ---------------------------------------------------------------------------- coverage
def clustered(rng: np.random.Generator, n_units: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``n_units`` carriers: x = delta + u (one per carrier, sd 1) + e (sd 0.5),
    carrier lengths 5–60: the position-weighted mean estimates ``delta``."""
    n = rng.integers(5, 61, size=n_units)
    units = np.repeat(np.arange(n_units), n)
    x = delta + rng.normal(0, 1.0, n_units)[units] + rng.normal(0, 0.5, len(units))
    return x, units


def coverage(unit_of, reps: int = 300, n_units: int = 40, delta: float = 0.3, n_boot: int = 400) -> float:
    """Share of seeded repetitions whose 95% interval holds ``delta``; ``unit_of(units)`` says
    what the bootstrap resamples (carriers, or positions)."""
    hits = 0
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        x, units = clustered(rng, n_units, delta)
        u = unit_of(units)
        sums, n = unit_sums(x, u, u.max() + 1)
        iv = weighted_ci(sums, n, resample_counts(np.zeros(u.max() + 1), n_boot, rng))
        hits += bool(iv.lo[0] <= delta <= iv.hi[0])
    return hits / reps


def test_carrier_bootstrap_covers_a_known_difference_at_the_nominal_rate():
    # 300 repetitions: a 95% interval has sd ≈ 1.3% of coverage; [0.90, 0.99] is about 4 sd wide
    assert 0.90 <= coverage(lambda units: units) <= 0.99


def test_a_position_level_bootstrap_under_covers_the_same_data():
    """Why the units are carriers: resampling correlated positions as if independent gives
    intervals far too narrow (here ~5× too narrow: the carrier effect dominates)."""
    assert coverage(lambda units: np.arange(len(units)), reps=50, n_boot=200) < 0.6


def test_resample_counts_keep_each_stratum_and_match_the_closed_form_variance():
    strata = np.array(["a"] * 7 + ["b"] * 3)
    counts = resample_counts(strata, 4000, seed=1)
    assert counts.shape == (4000, 10) and (counts >= 0).all()
    np.testing.assert_array_equal(counts[:, :7].sum(1), 7)
    np.testing.assert_array_equal(counts[:, 7:].sum(1), 3)
    # one stratum of U equal-size units: Var*(mean) = (1/U) · (1/U) Σ (x_u − x̄)² (the plug-in variance)
    x = np.random.default_rng(2).normal(size=25)
    boot = resample_counts(np.zeros(25), 4000, seed=3) @ x / 25
    assert boot.var() == pytest.approx(x.var() / 25, rel=0.1)
    np.testing.assert_array_equal(counts, resample_counts(strata, 4000, seed=1))  # seeded


def test_weighted_ci_edge_cases():
    counts = resample_counts(np.zeros(3), 200, seed=0)
    # one unit holds every position: a mean, no interval
    iv = weighted_ci(np.array([[2.0], [0.0], [0.0]]), np.array([4.0, 0.0, 0.0]), counts)
    assert iv.mean[0] == 0.5 and np.isnan(iv.lo[0]) and iv.n_units == 1
    # an infinite value (a truncated KL): mean inf, no interval; the finite column keeps its own
    iv = weighted_ci(np.array([[np.inf, 1.0], [1.0, 3.0], [2.0, 2.0]]), np.ones(3), counts)
    assert iv.mean[0] == np.inf and np.isnan(iv.lo[0]) and iv.lo[1] <= 2.0 <= iv.hi[1]
    # resamples without a position of the group are left out, never NaN
    iv = weighted_ci(np.array([[1.0], [3.0], [0.0]]), np.array([1.0, 1.0, 0.0]), counts)
    assert 0 < iv.n_boot < 200 and 1.0 <= iv.lo[0] <= iv.hi[0] <= 3.0
    with pytest.raises(ValueError, match="ci_level must lie in"):
        weighted_ci(np.ones((3, 1)), np.ones(3), counts, level=95)


def test_sign_test_is_scipys_binomial_test_on_unit_means():
    sums = np.array([[1.0], [2.0], [-1.0], [0.0], [5.0]])
    n = np.array([2.0, 1.0, 3.0, 1.0, 0.0])  # unit 4 holds no position; unit 3 is a tie
    assert sign_test(sums, n)[0] == pytest.approx(binomtest(2, 3, 0.5).pvalue)


# ---------------------------------------------------------------------------- strata
def test_length_bins_are_quantiles_and_merge_ties():
    bins, labels = length_bins(np.arange(1, 13), 3)
    assert labels == ["1–4 tok", "5–8 tok", "9–12 tok"] and list(bins) == [0] * 4 + [1] * 4 + [2] * 4
    # a length held by more than a bin's share of rows cannot be split: tied edges merge
    bins, labels = length_bins(np.array([2, 5, 5, 5, 5, 5, 5, 9, 12]), 3)
    assert labels == ["2–2 tok", "5–12 tok"] and list(bins) == [0] + [1] * 8
    with pytest.raises(ValueError, match="length_bins must be a positive integer"):
        length_bins(np.arange(3), 0)


def test_correctness_from_the_run_rewards_and_unknown_without_answer():
    from typing import get_args

    from isdelta.tokens.options import RewardName
    from isdelta.training import REWARDS

    assert set(get_args(RewardName)) == set(REWARDS)  # tokens spells out the names training defines
    r = np.array([REWARDS["answer_match"](t, "5") for t in ("so it is 5", "it is 6", "no number")] + [np.nan])
    np.testing.assert_array_equal(r[:3], [1.0, 0.0, 0.0])
    assert list(correctness(r)) == ["correct", "incorrect", "incorrect", "unknown"]
    with pytest.raises(ValueError, match="reward must be one of"):
        TokenOptions(reward="exact")
    table = {
        "carrier": np.array(["p0", "p0", "p0", "ref"], dtype=object),
        "row": np.array([0, 1, 1, 0]),
        "length": np.array([3, 9, 9, 4]),
    }
    out = add_strata(table, {"p0": np.array([1.0, 0.0])}, 2)
    assert list(out["correct"]) == ["correct", "incorrect", "incorrect", "unknown"]  # ref: no rewards given
    assert list(out["length_bin"]) == ["3–3 tok", "4–9 tok", "4–9 tok", "4–9 tok"]  # edges over 3 units
    with pytest.raises(ValueError, match=r"rewards\['p0'\] holds 1 values"):
        add_strata(table, {"p0": np.array([1.0])}, 2)


# ---------------------------------------------------------------------------- a constructed table
def constructed(rng: np.random.Generator, strict_shift: float = 0.05, n_rows: int = 40) -> TokenComparison:
    """One carrier of ``n_rows`` rows × 20 positions: steps 0–4 strict locks (top-1 Δ ≈ +shift),
    5–7 swaps (≈ −0.3), 8–9 self-correction swaps (≈ −0.2), 10–14 forks (nucleus Δ +1 on half
    the rows, −1 on the other half: mean exactly 0),
    the rest mixed; every delta has a per-row effect (the rows are the units)."""
    R, P = n_rows, 20
    row, step = np.repeat(np.arange(R), P), np.tile(np.arange(P), R)
    M, u = R * P, rng.normal(0, 0.02, R)[np.repeat(np.arange(R), P)]
    cls = np.select([step < 10, step < 15], ["lock", "fork"], "mixed").astype(object)
    top1 = np.select([step < 5, step < 8, step < 10], [strict_shift, -0.3, -0.2], 0.0) + u + rng.normal(0, 0.01, M)
    t = {
        "carrier": np.full(M, "p0 samples", dtype=object),
        "row": row,
        "step": step,
        "prompt": row // 4,
        "token_id": rng.integers(3, 8, M),
        "prev_token_id": rng.integers(3, 8, M),
        "length": np.repeat(rng.integers(5, 40, R), P),
        "a_class": cls,
        "b_class": cls,
        "lock_type": np.where(cls == "lock", np.where(step < 5, "strict", "swap"), "").astype(object),
        "self_correction": (step >= 8) & (step < 10),
        "top1_same": step < 5,
        "a_entropy": rng.uniform(0, 2, M),
        "b_entropy": rng.uniform(0, 2, M),
        "a_topk_id": rng.integers(3, 8, (M, 2)),
    }
    t["b_topk_id"] = t["a_topk_id"]
    for m in "ab":  # what the markdown's example tables show
        t[f"{m}_topk_p"] = np.full((M, 2), 0.5)
        t[f"{m}_nucleus"], t[f"{m}_tail"] = np.ones(M, dtype=np.int64), np.zeros(M)
    t["context"] = np.full(M, "ctx", dtype=object)
    for s in ("", "_trunc"):
        t[f"top1_delta{s}"] = top1
        t[f"nucleus_delta{s}"] = np.where(cls == "fork", np.where((row // 2) % 2 == 0, 1.0, -1.0), 0.0)
        t[f"tail_delta{s}"] = rng.normal(0, 0.01, M)
        t[f"entropy_delta{s}"] = t["b_entropy"] - t["a_entropy"]
        t[f"kl_ab{s}"] = t[f"kl_ba{s}"] = rng.uniform(0, 0.1, M)
    rewards = {"p0 samples": (np.arange(R) % 2).astype(float)}
    return TokenComparison(add_strata(t, rewards, 2), {}, {"thresholds": {}, "transform": {}})


def _probe(summary: dict, question: str, carrier: str = "p0 samples") -> dict:
    return next(r for r in summary["probing"] if r["question"] == question and r["carrier"] == carrier)


def test_probing_table_answers_the_questions_on_a_constructed_case(rng):
    res = constructed(rng)
    s = summarise(res, TokenOptions(n_boot=500))
    strict = _probe(s, "strict locks")
    naive = res["top1_delta"][(res["a_class"] == "lock") & (res["lock_type"] == "strict")].mean()
    assert strict["estimate"] == pytest.approx(naive) and strict["n"] == 5 * 40 and strict["n_units"] == 40
    assert strict["ci"][0] < naive < strict["ci"][1] and strict["verdict"] == "supported" and strict["excl0"]
    assert strict["sign_p"] < 1e-6  # 40 of 40 rows positive
    assert _probe(s, "swaps")["verdict"] == "supported" and _probe(s, "swaps")["estimate"] < -0.2
    assert _probe(s, "self-corrections")["verdict"] == "supported" and _probe(s, "self-corrections")["n"] == 80
    fork = _probe(s, "forks")
    assert fork["statistic"] == "nucleus_delta" and fork["verdict"] == "consistent (CI ∋ 0)"
    assert {r["carrier"] for r in s["probing"]} == {"p0 samples", "all carriers"}
    assert _probe(s, "strict locks", "all carriers")["n_units"] == 10  # pooled: the unit is the prompt
    # strata: two length bins × correctness (even rows correct); each stratum's rows are its own
    strata = s["carriers"]["p0 samples"]["strata"]
    assert [r["stratum"] for r in strata["correct"]] == ["correct", "incorrect"]
    assert [r["n_units"] for r in strata["correct"]] == [20, 20]
    assert sum(r["n_units"] for r in strata["length"]) == 40
    assert any(r["carrier"] == "p0 samples / correct: incorrect" for r in s["probing_strata"])
    # every aggregate carries an interval on both views, and the signed ones a flag and a p-value
    for cat in s["carriers"]["p0 samples"]["categories"]:
        if cat["n"]:
            assert all(f"{k}_ci" in cat for k in STATS) and "entropy_delta_trunc_excl0" in cat
    # the opposite shift contradicts the claim
    flipped = summarise(constructed(np.random.default_rng(0), strict_shift=-0.05), TokenOptions(n_boot=300))
    assert _probe(flipped, "strict locks")["verdict"] == "contradicted"
    lines = markdown_lines(res, ("p0", "p1"), 0, None, s)
    md = "\n".join(lines)
    assert "| strict locks | p0 samples | top1_delta | > 0 |" in md and "### Probing questions by stratum" in md
    json.dumps(s, allow_nan=False)


def test_probing_rows_report_missing_groups():
    cats = [
        {"category": c, "n": 0, "n_units": 0, f"{k}": None, f"{k}_ci": None, f"{k}_excl0": None, f"{k}_sign_p": None}
        for c in ("lock/strict", "lock/swap", "lock/self-correction", "fork")
        for k in ("top1_delta", "nucleus_delta")
    ]
    by = {}
    for c in cats:  # merge the two statistics' fields per category
        by.setdefault(c["category"], {}).update(c)
    rows = probing_rows({"x": list(by.values())})
    assert len(rows) == 4 and all(r["verdict"] == "no positions" for r in rows)


# ---------------------------------------------------------------------------- token texts
def test_token_text_means_match_a_naive_loop(rng):
    res = constructed(rng, n_rows=6)
    for kind, col in (("current", "prev_token_id"), ("next", "token_id")):
        rows = by_token(res, kind)
        assert sum(r["n"] for r in rows) == len(res)
        for r in rows:
            at = res[col] == r["token_id"]
            assert r["n"] == at.sum() and r["a_entropy"] == pytest.approx(res["a_entropy"][at].mean())
            assert r["entropy_delta"] == pytest.approx(res["entropy_delta"][at].mean())
    s = token_text_summary(res, min_count=3, n_list=2)
    most, least = s["next"]["most_uncertain"], s["next"]["least_uncertain"]
    allowed = [r for r in by_token(res, "next") if r["n"] >= 3]
    assert most[0]["a_entropy"] == max(r["a_entropy"] for r in allowed) and len(most) == 2
    assert least[0]["a_entropy"] == min(r["a_entropy"] for r in allowed)
    assert token_text_summary(res, min_count=10**6)["current"]["most_uncertain"] == []
    with pytest.raises(ValueError, match="kind must be one of"):
        by_token(res, "previous")


# ---------------------------------------------------------------------------- the stage on tiny models
@pytest.fixture(scope="module")
def model_b(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m


def test_run_tokens_writes_strata_intervals_and_token_texts(tmp_path, char_tok, tiny_llama, model_b):
    prompt = char_tok("Q:")["input_ids"]
    comps = [char_tok(s, add_special_tokens=False)["input_ids"] + [2] for s in ("it is 5", "6", "maybe 5 or 6", "x")]
    ro = Rollouts.from_token_lists([prompt] * 4, comps, eos_token_ids=2, pad_token_id=2)
    res = compare_tokens(tiny_llama, model_b, ro, tokenizer=char_tok, progress=False)
    # the current token is the one before the position (the last prompt token at step 0)
    first = res["step"] == 0
    assert (res["prev_token_id"][first] == prompt[-1]).all()
    later = np.flatnonzero(~first)
    np.testing.assert_array_equal(
        res["prev_token_id"][later], ro.completion_ids[res["row"][later], res["step"][later] - 1]
    )
    rewards = np.array([1.0, 0.0, 0.0, np.nan])  # answer_match against "5"; the last prompt has no answer
    opts = TokenOptions(n_boot=200, length_bins=2, token_min_count=2, progress=False)
    rep = run_tokens(
        tiny_llama,
        model_b,
        {"p0 samples": ro, "reference": ro},
        tokenizer=char_tok,
        options=opts,
        names=("p0", "p1"),
        out_dir=tmp_path,
        plots=False,
        rewards={"p0 samples": rewards},
    )
    s = rep["summary"]
    strata = s["carriers"]["p0 samples"]["strata"]
    assert [r["stratum"] for r in strata["correct"]] == ["correct", "incorrect", "unknown"]
    assert [r["stratum"] for r in s["carriers"]["reference"]["strata"]["correct"]] == ["unknown"]
    assert s["carriers"]["p0 samples"]["headline"]["top1_delta_ci"] is not None
    assert s["bootstrap"]["n_units"] == 8 and s["bootstrap"]["unit"] == "row"
    md = (tmp_path / "tokens.md").read_text()
    assert "### Probing questions" in md and "### Mean entropy by token text" in md and "By stratum" in md
    with open(tmp_path / "tokens_by_text.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["carrier"] for r in rows} == {"all carriers", "p0 samples", "reference"}
    next_all = [r for r in rows if r["carrier"] == "all carriers" and r["kind"] == "next"]
    assert sum(int(r["n"]) for r in next_all) == len(res) * 2
    with open(tmp_path / "tokens.csv") as f:
        head = next(csv.reader(f))
    assert {"length", "length_bin", "correct", "prev_token_id"} <= set(head)
    assert json.loads((tmp_path / "tokens.json").read_text())["summary"]["probing"] == s["probing"]


def test_the_run_config_takes_the_new_keys_and_checks_them():
    from isdelta.run.config import load_config

    base = {"model": {"path": "x"}, "data": {"path": "x"}, "update": {"loss": "reinforce", "lr": 1e-3}}
    cfg = load_config({**base, "tokens": {"length_bins": 4, "n_boot": 200, "reward": "boxed_match"}})
    opts = cfg.tokens.options()
    assert (opts.length_bins, opts.n_boot, opts.reward, opts.bootstrap_unit) == (4, 200, "boxed_match", "row")
    with pytest.raises(Exception, match="tokens.reward"):
        load_config({**base, "tokens": {"reward": "exact"}})
    with pytest.raises(Exception, match="tokens.bootstrap_unit"):
        load_config({**base, "tokens": {"bootstrap_unit": "position"}})


def test_pooling_a_duplicated_carrier_does_not_narrow_the_pooled_interval(rng):
    """p1's samples share p0's seeds and prefixes; in the extreme they repeat p0's rows. Pooled
    over carriers, the prompt is the unit, so a copy of a carrier adds no information: the
    pooled interval is the same (a row-level pooled bootstrap would shrink it by about √2)."""
    res = constructed(rng)
    twice = TokenComparison.concat(
        [res, TokenComparison({**res.table, "carrier": np.full(len(res), "p1 samples", dtype=object)}, {}, res.options)]
    )
    one, two = (_probe(summarise(r, TokenOptions(n_boot=300)), "strict locks", "all carriers") for r in (res, twice))
    assert two["n"] == 2 * one["n"] and two["estimate"] == pytest.approx(one["estimate"])
    np.testing.assert_allclose(two["ci"], one["ci"], rtol=1e-12)


def test_an_empty_selection_still_reports(char_tok, tiny_llama, model_b, tmp_path):
    prompt = char_tok("Q:")["input_ids"]
    ro = Rollouts.from_token_lists(
        [prompt], [char_tok("abc", add_special_tokens=False)["input_ids"]], eos_token_ids=2, pad_token_id=2
    )
    opts = TokenOptions(positions="pattern", n_random=0, n_boot=50, progress=False)
    rep = run_tokens(tiny_llama, model_b, {"p0 samples": ro}, tokenizer=char_tok, options=opts, out_dir=tmp_path)
    assert rep["summary"]["n_positions"] == 0
    assert all(r["verdict"] == "no positions" for r in rep["summary"]["probing"])
