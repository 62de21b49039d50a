"""Entropy as a predictor (`isdelta.score.predictor`): the logistic fit against a simulation with
known coefficients, the LR test against the closed-form intercept-only likelihood, AUC against
the naive pair count, correlation matrices against numpy, and the bad-input paths; then the
whole `predictor:` section through `python -m isdelta.score` on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from isdelta.program import ConfigError
from isdelta.score import score
from isdelta.score.config import load_score_config
from isdelta.score.predictor import (
    PredictorInputError,
    analyse,
    auc,
    correlation_groups,
    correlations,
    fit_logit,
    fits_csv,
    model_specs,
    parse_label,
)
from isdelta.score.report import predictor_markdown


def simulate(rng, n=4000, beta=(-1.0, 0.8, -0.6)):
    """y ~ Bernoulli(σ(β0 + β1 H + β2 √V)) with H, V like per-text entropies (nats, nats²)."""
    H = rng.gamma(4.0, 0.5, n)
    V = rng.gamma(2.0, 1.0, n)
    eta = beta[0] + beta[1] * H + beta[2] * np.sqrt(V)
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return y, H, V


def test_fit_recovers_known_coefficients_within_two_se(rng):
    beta = (-1.0, 0.8, -0.6)
    y, H, V = simulate(rng, beta=beta)
    f = fit_logit(y, np.stack([H, np.sqrt(V)], 1), ["H", "sqrtV"], "sim")
    assert f.status == "ok"
    for term, b in zip(["const", "H", "sqrtV"], beta):
        assert abs(f.coef[term] - b) < 2 * f.se[term], (term, f.coef[term], f.se[term])
        assert f.ci_low[term] < f.coef[term] < f.ci_high[term]
    assert f.p["H"] < 1e-6 and f.lr_df == 2 and f.lr_p < 1e-6


def test_two_se_coverage_over_seeded_simulations():
    """±2 SE covers the true slope in ≈ 95.4% of 200 simulations (binomial sd ≈ 1.5%)."""
    hits = 0
    for seed in range(200):
        y, H, V = simulate(np.random.default_rng(seed), n=400)
        f = fit_logit(y, np.stack([H, np.sqrt(V)], 1), ["H", "sqrtV"])
        hits += abs(f.coef["H"] - 0.8) < 2 * f.se["H"]
    assert 0.90 <= hits / 200 <= 0.99


def test_lr_test_matches_the_closed_form_null_likelihood(rng):
    y, H, _ = simulate(rng, n=500)
    f = fit_logit(y, H[:, None], ["H"])
    p = y.mean()  # the intercept-only MLE: the class rate
    ll0 = len(y) * (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert f.llnull == pytest.approx(ll0, rel=1e-8)  # statsmodels fits the null iteratively
    assert f.lr_stat == pytest.approx(2 * (f.llf - ll0), abs=1e-6)
    assert f.lr_p == pytest.approx(stats.chi2.sf(f.lr_stat, 1), rel=1e-8)


def test_a_regressor_unrelated_to_the_outcome_is_not_significant():
    """Under the null the LR p-value is uniform: ≈ 5% of 200 simulations fall below 0.05."""
    rejections = 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        x = rng.normal(size=200)
        y = (rng.random(200) < 0.4).astype(float)
        rejections += fit_logit(y, x[:, None], ["x"]).lr_p < 0.05
    assert rejections / 200 < 0.10


def test_auc_is_the_pair_count_with_ties_as_half(rng):
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = (rng.random(60) < 0.5).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    naive = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auc(s, y) == pytest.approx(naive, abs=1e-12)
    assert auc(-s, y) == pytest.approx(1 - naive, abs=1e-12)
    yy = (s > 2).astype(float)
    assert auc(s, yy) == 1.0


def test_fitted_auc_of_one_regressor_is_its_own_auc(rng):
    y, H, _ = simulate(rng, n=300)
    f = fit_logit(y, H[:, None], ["H"])  # β > 0: the fitted probability is increasing in H
    assert f.coef["H"] > 0 and f.auc == pytest.approx(auc(H, y), abs=1e-12)


def test_correlation_matrices_match_numpy_on_values_and_ranks(rng):
    x = rng.normal(size=50)
    cols = {"a": x, "b": x**3 + rng.normal(size=50), "c": rng.normal(size=50), "k": np.ones(50)}
    cols["a"][3] = np.nan  # that text drops out of every column
    r = correlations(cols)
    ok = np.isfinite(cols["a"])
    X = np.stack([cols[n][ok] for n in "abc"])
    R = np.corrcoef(X)
    Rs = np.corrcoef(np.stack([stats.rankdata(v) for v in X]))
    for i, a in enumerate("abc"):
        for j, b in enumerate("abc"):
            assert r["pearson"][a][b] == pytest.approx(R[i, j], abs=1e-12)
            assert r["spearman"][a][b] == pytest.approx(Rs[i, j], abs=1e-12)
    assert r["pearson"]["k"]["a"] is None and r["spearman"]["k"]["k"] is None  # constant: undefined


def test_single_class_too_few_texts_and_bad_labels_are_errors(rng):
    H = rng.normal(size=40)
    with pytest.raises(PredictorInputError, match=r"0 outcome 0 .* nothing to predict"):
        fit_logit(np.ones(40), H[:, None], ["H"])
    with pytest.raises(PredictorInputError, match=r"6 texts with a known outcome .* needs ≥ 10"):
        fit_logit(np.array([0, 1] * 3, float), H[:6, None], ["H"])
    assert [parse_label(v) for v in (True, 0, 1.0, "false", "1", None)] == [1.0, 0.0, 1.0, 0.0, 1.0, None]
    with pytest.raises(ValueError, match="expected 0/1 or true/false"):
        parse_label(2)


def test_perfect_separation_is_reported_without_nan():
    H = np.arange(20.0)
    y = (H > 9.5).astype(float)
    f = fit_logit(y, H[:, None], ["H"], "H_mean")
    assert f.status == "separated" and "perfect separation" in f.note
    assert f.coef == {} and f.p == {} and f.auc == pytest.approx(1.0)
    text = "\n".join(
        predictor_markdown(
            {
                "model": "m",
                "outcome": {"source": "label", "field": "label"},
                "n_used": 20,
                "n_positive": 10,
                "n_no_outcome": 0,
                "n_unscored": 0,
                "level": 0.95,
                "fits": [f.to_dict()],
                "correlations": {"g": correlations({"H": H, "outcome": y})},
            }
        )
    )
    assert "n/a (separated)" in text and "nan" not in text.lower()
    csv_rows = fits_csv([f.to_dict()]).splitlines()
    assert len(csv_rows) == 2 and csv_rows[1].startswith("H_mean,,,") and ",separated," in csv_rows[1]
    assert "nan" not in csv_rows[1].lower()


def test_analyse_counts_left_out_texts_and_fits_every_spec(rng):
    n = 120
    y, H, V = simulate(rng, n=n)
    cols = {
        "entropy_mean": H,
        "varentropy_mean": V,
        "nll_mean": H + rng.normal(size=n),
        "n_tokens": rng.integers(3, 30, n).astype(float),
        "entropy_last": H + rng.normal(size=n),
        "varentropy_last": V * rng.random(n),
        "entropy_next": rng.gamma(2.0, 1.0, n),
        "varentropy_next": rng.gamma(2.0, 1.0, n),
    }
    y[:5] = np.nan
    cols["entropy_mean"][5:8] = np.nan  # unscored texts
    res = analyse(y, cols, model_specs(), correlation_groups())
    assert (res["n_used"], res["n_no_outcome"], res["n_unscored"]) == (n - 8, 5, 3)
    assert [f["name"] for f in res["fits"]] == list(model_specs())
    assert all(f["n"] == n - 8 for f in res["fits"])
    assert set(res["correlations"]) == {"aggregated", "last"}
    assert res["correlations"]["last"]["pearson"]["outcome"]["outcome"] == 1.0
    json.dumps(res, allow_nan=False)  # JSON-safe
    rows = fits_csv(res["fits"]).splitlines()
    assert len(rows) == 1 + 2 * 2 + 3 * 4  # header, two one-term fits, four two-term fits


# ---------------------------------------------------------------------------- the program
def labelled_corpus(tmp_path, n=24, labels=None) -> str:
    words = ["the cat sat", "qzx plok", "1 2 3 4", "hello there", "zzzz", "a b a b a", "Roses are red", "#!@%"]
    p = tmp_path / "labelled.jsonl"
    labels = labels if labels is not None else [i % 3 == 0 for i in range(n)]
    p.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "text": words[i % 8] * (1 + i % 3), "label": labels[i]}) + "\n" for i in range(n)
        )
    )
    return str(p)


def pred_cfg(tmp_path, checkpoint, **predictor) -> dict:
    return {
        "models": [{"name": "a", "path": str(checkpoint)}],
        "data": {"path": labelled_corpus(tmp_path)},
        "engine": {"chunk_texts": 8, "token_budget": 256},
        "curriculum": None,
        "predictor": predictor or {},
        "output": {"dir": str(tmp_path / "out"), "plots": True},
    }


def test_program_writes_csv_json_plot_and_report(tmp_path, checkpoint):
    summary = score(load_score_config(pred_cfg(tmp_path, checkpoint)))
    out = tmp_path / "out"
    pred = json.loads((out / "predictor" / "predictor.json").read_text())
    assert pred["n_used"] == 24 and pred["n_positive"] == 8 and len(pred["fits"]) == 6
    stats_rows = [json.loads(x) for x in (out / "models" / "a" / "stats.jsonl").read_text().splitlines()]
    H = np.array([r["entropy_mean"] for r in stats_rows])
    y = np.array([i % 3 == 0 for i in range(24)], float)
    ref = fit_logit(y, H[:, None], ["entropy_mean"])  # the program fits the saved statistics
    got = next(f for f in pred["fits"] if f["name"] == "H_mean")
    assert got["status"] == ref.status
    if ref.status == "ok":
        assert got["coef"]["entropy_mean"] == pytest.approx(ref.coef["entropy_mean"], rel=1e-9)
    assert (out / "predictor" / "predictor.csv").read_text().startswith("model,term,coef,se")
    assert (out / "plots" / "predictor.png").stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert "## Entropy as a predictor of the outcome" in md and "nan" not in md.lower()
    assert summary["predictor"]["outcome"] == {"source": "label", "field": "label"}


@pytest.mark.parametrize(
    "labels, pattern",
    [
        ([1] * 24, r"predictor.label_field 'label': 24 texts have outcome 1 and 0 outcome 0"),
        ([0, 1] * 4 + [None] * 16, r"8 texts with a known outcome \(of 24\)"),
        ([0, 1, "maybe"] * 8, r"text 2 \(id 't2'\) has label='maybe' — expected 0/1"),
    ],
)
def test_bad_outcomes_fail_before_any_model_loads(tmp_path, checkpoint, labels, pattern, monkeypatch):
    import isdelta.score.pipeline as pipeline

    raw = pred_cfg(tmp_path, checkpoint)
    raw["data"]["path"] = labelled_corpus(tmp_path, labels=labels)
    monkeypatch.setattr(pipeline, "score_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=pattern):
        score(load_score_config(raw))


def test_a_corpus_without_the_label_field_names_the_field(tmp_path, checkpoint):
    raw = pred_cfg(tmp_path, checkpoint, label_field="correct")
    with pytest.raises(ConfigError, match=r"text 0 \(id 't0'\) .* has no 'correct' field .* set predictor.label_field"):
        score(load_score_config(raw))


@pytest.mark.parametrize(
    "patch, pattern",
    [
        ({"model": "nope"}, r"predictor.model 'nope' is none of the models"),
        ({"answer": {"reward": "exact"}}, r"predictor.answer.reward 'exact' is not a reward rule"),
        ({"outcome": "guess"}, r"predictor.outcome"),
    ],
)
def test_predictor_config_errors_name_the_key(tmp_path, checkpoint, patch, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_score_config(pred_cfg(tmp_path, checkpoint, **patch))


def test_answer_outcome_samples_grades_and_reuses_answers(tmp_path, checkpoint, capsys):
    """The tiny random model answers nothing right: the answers are saved, graded 0, and the fit
    is skipped with the reason (a single class) — no crash, no NaN; a rerun reuses the answers."""
    p = tmp_path / "qa.jsonl"
    p.write_text(
        "".join(json.dumps({"id": i, "prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(12))
        + json.dumps({"id": "no-answer", "prompt": "hi"})
        + "\n"
    )
    raw = pred_cfg(tmp_path, checkpoint, outcome="answer", answer={"max_new_tokens": 4, "chat": False})
    raw["data"] = {"path": str(p), "text_field": "prompt"}
    summary = score(load_score_config(raw))
    rows = [json.loads(x) for x in (tmp_path / "out" / "outcome" / "answers.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))  # the row without an answer is left out
    assert all(r["label"] == float(r["reward"] > 0) for r in rows)
    pred = summary["predictor"]
    assert pred["outcome"]["n_answered"] == 12
    if pred["outcome"]["accuracy"] in (0.0, 1.0):
        assert "nothing to predict" in pred["skipped"]
        assert "No fit:" in (tmp_path / "out" / "summary.md").read_text()
    score(load_score_config(raw))
    assert "reusing 12 answers" in capsys.readouterr().err


def test_cluster_robust_ses_widen_for_correlated_texts_and_match_statsmodels():
    """Answers to one prompt share its difficulty: with a per-prompt random effect the ordinary
    SE is too small, the cluster-robust one (statsmodels' sandwich over clusters) is not."""
    import statsmodels.api as sm

    rng = np.random.default_rng(5)
    n_groups, per = 150, 8
    g = np.repeat(np.arange(n_groups), per)
    x = np.repeat(rng.normal(size=n_groups), per) + 0.3 * rng.normal(size=n_groups * per)
    u = np.repeat(rng.normal(scale=1.5, size=n_groups), per)  # the shared difficulty
    y = (rng.random(len(g)) < 1 / (1 + np.exp(-(0.8 * x + u)))).astype(float)
    plain = fit_logit(y, x[:, None], ["x"])
    robust = fit_logit(y, x[:, None], ["x"], clusters=g.astype(str))
    assert robust.coef == plain.coef and robust.lr_stat == plain.lr_stat  # same fit and likelihood
    assert robust.se["x"] > 1.5 * plain.se["x"]
    ref = sm.Logit(y, sm.add_constant(x)).fit(disp=0, cov_type="cluster", cov_kwds={"groups": g})
    assert robust.se["x"] == pytest.approx(float(ref.bse[1]), rel=1e-9)
