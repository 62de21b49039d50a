"""`python -m isdelta.score`: per-text statistics against a naive full-logits reference, batch
invariance, curriculum bins, resuming, model comparison (against scipy / numpy), config errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import isdelta.score.scorer as scorer_mod
from isdelta.engine import EngineConfig, LogProbEngine
from isdelta.program import ConfigError
from isdelta.score import main, score
from isdelta.score.compare import compare_models, pca
from isdelta.score.config import ScoreData, load_score_config
from isdelta.score.corpus import Record, iter_records, read_span
from isdelta.score.curriculum import build_curriculum, combine_key
from isdelta.score.scorer import Encoder, absent_id, score_chunk
from isdelta.score.stats import STATS

TOL = 1e-5  # fp32 engine vs a float64 reference on fp32 logits
TEXTS = [
    "The cat sat.",
    "2 + 2 = 4",
    "def f(x):\n    return x",
    "qzx vbnm plok",
    "a",
    "Roses are red, violets are blue.",
    "hello hello hello hello",
    "#!@%^&*()",
]


def records(texts=TEXTS) -> list[Record]:
    """Records with user turns of different lengths (used by wrap=assistant: left-padded contexts)."""
    return [Record(i, f"t{i}", t, "Say:" + "?" * (i % 5), (0, 0)) for i, t in enumerate(texts)]


def naive_stats(model, ctx: list[int], text: list[int], T: float = 1.0) -> dict[str, float]:
    """Full fp32 logits of context + text alone (no padding, no batching), reduced in float64."""
    ids = torch.tensor([ctx + text])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / T  # [len, V]
    logp = torch.log_softmax(logits, -1)[len(ctx) - 1 :]  # [n + 1, V]: rows predict t1..tn, then "next"
    H = -(logp.exp() * logp).sum(-1)
    VH = (logp.exp() * (logp + H[:, None]) ** 2).sum(-1)
    n = len(text)
    nll = -logp[torch.arange(n), torch.tensor(text)]
    return {
        "n_tokens": n,
        "entropy_mean": H[:n].mean(),
        "entropy_sum": H[:n].sum(),
        "varentropy_mean": VH[:n].mean(),
        "nll_mean": nll.mean(),
        "nll_mean_bits": nll.mean() / math.log(2),
        "nll_sum": nll.sum(),
        "entropy_last": H[n - 1],
        "varentropy_last": VH[n - 1],
        "entropy_next": H[n],
        "varentropy_next": VH[n],
    }


def data(**kw) -> ScoreData:
    return ScoreData(path="unused.jsonl", **kw)


def engine(T=1.0, budget=16384) -> LogProbEngine:
    return LogProbEngine(EngineConfig(temperature=T, token_budget=budget, progress=False))


# ---------------------------------------------------------------------------- statistics
CASES = [
    ("none", "bos", 1.0),
    ("none", "none", 1.0),
    ("none", "eos", 0.7),
    ("user", "bos", 1.0),
    ("assistant", "bos", 1.3),
]


# GPT-2 (absolute positions) breaks visibly if left padding shifts positions (wrap=assistant)
@pytest.mark.parametrize(
    "model_name,wrap,prefix,T",
    [("tiny_llama", *c) for c in CASES] + [("tiny_gpt2", *c) for c in CASES if c[0] != "user"],
)
def test_stats_match_naive_full_logits_per_text(request, char_tok, model_name, wrap, prefix, T):
    model = request.getfixturevalue(model_name)
    enc = Encoder(char_tok, data(wrap=wrap, prefix=prefix, user_message="hi"), max_positions=256)
    rows = score_chunk(model, engine(T), enc, records())
    for row, e in zip(rows, enc(records())):
        if not e.text:  # "a" with prefix none: its only token is the context
            assert prefix == "none" and row["n_tokens"] == 0 and row["entropy_mean"] is None
            continue
        ref = naive_stats(model, e.context, e.text, T)
        for k, v in ref.items():
            assert row[k] == pytest.approx(float(v), rel=TOL, abs=TOL), (row["id"], k)
    # bits per char only where every character was scored
    assert all((r["bits_per_char"] is None) == (prefix == "none" and wrap == "none") for r in rows if r["n_tokens"])


def test_context_is_bos_template_or_first_token(char_tok):
    recs = records(["xyz"])
    assert Encoder(char_tok, data(prefix="bos"))(recs)[0].context == [char_tok.bos_token_id]
    first = Encoder(char_tok, data(prefix="none"))(recs)[0]
    assert len(first.context) == 1 and len(first.text) == 2  # the first token is not scored
    user = Encoder(char_tok, data(wrap="user"))(recs)[0]
    assert char_tok.decode(user.context) == "<u>" and char_tok.decode(user.text) == "xyz"
    asst = Encoder(char_tok, data(wrap="assistant"))(recs)[0]
    assert char_tok.decode(asst.context) == "<u>Say:\n<a>" and char_tok.decode(asst.text) == "xyz"
    named = Encoder(char_tok, data(prefix="token", prefix_token="</s>"))(recs)[0]
    assert named.context == [char_tok.eos_token_id]
    with pytest.raises(ConfigError, match="data.prefix_token"):
        Encoder(char_tok, data(prefix="token", prefix_token="<nope>"))


def test_batch_composition_does_not_change_stats(tiny_llama, char_tok):
    enc = Encoder(char_tok, data(), max_positions=256)
    one_batch = score_chunk(tiny_llama, engine(budget=100_000), enc, records())
    tiny_batches = score_chunk(tiny_llama, engine(budget=8), enc, records())  # one row per forward
    reversed_ = score_chunk(tiny_llama, engine(budget=64), enc, records()[::-1])[::-1]
    for a, b, c in zip(one_batch, tiny_batches, reversed_):
        for k in STATS:
            # fp32: padding and batch shape change the summation order, not the values beyond rounding
            assert a[k] == pytest.approx(b[k], rel=TOL, abs=TOL) and a[k] == pytest.approx(c[k], rel=TOL, abs=TOL), k


def test_texts_holding_the_eos_token_are_scored_in_full(tiny_llama, char_tok):
    # "</s>" inside a text is the real EOS id (2); the engine stops only at the sentinel
    enc = Encoder(char_tok, data(), max_positions=256)
    (e,) = enc(records(["ab</s>cd"]))
    assert char_tok.eos_token_id in e.text and len(e.text) == 5
    (row,) = score_chunk(tiny_llama, engine(), enc, records(["ab</s>cd"]))
    assert row["n_tokens"] == 5
    assert row["nll_sum"] == pytest.approx(float(naive_stats(tiny_llama, e.context, e.text)["nll_sum"]), rel=TOL)


def test_sentinel_is_an_id_no_text_uses():
    assert absent_id([[4, 3], [4]], vocab_size=5) == 2
    with pytest.raises(ValueError, match="chunk_texts"):
        absent_id([[0, 1, 2]], vocab_size=3)


def test_long_texts_are_truncated_and_flagged(tiny_llama, char_tok):
    enc = Encoder(char_tok, data(max_tokens=4), max_positions=256)
    (row,) = score_chunk(tiny_llama, engine(), enc, records(["abcdefgh"]))
    assert row["n_tokens"] == 4 and row["truncated"] and row["bits_per_char"] is None
    short = Encoder(char_tok, data(max_tokens=None), max_positions=6)(records(["abcdefgh"]))[0]
    assert len(short.text) == 4  # 1 context + 4 text + 1 sentinel = the model's 6 positions


# ---------------------------------------------------------------------------- corpus
def test_txt_lines_and_paragraphs_stream_with_spans(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first line\n\nsecond\nstill second\n\n\nthird ü\n")
    lines = list(iter_records(data(format="txt"), p))
    paras = list(iter_records(data(format="txt", txt_unit="paragraph"), p))
    assert [r.text for r in lines] == ["first line", "second", "still second", "third ü"]
    assert [r.text for r in paras] == ["first line", "second\nstill second", "third ü"]
    with open(p, "rb") as f:
        assert [read_span(f, r.span, "txt", "text", r.id)["text"] for r in paras] == [r.text for r in paras]
    assert [r.index for r in iter_records(data(format="txt", limit=2), p)] == [0, 1]


# ---------------------------------------------------------------------------- curriculum
@pytest.mark.parametrize("binning", ["count", "width"])
@pytest.mark.parametrize("schedule", ["increasing", "decreasing", [2, 0, 1]])
def test_bins_partition_the_keyed_texts_in_sorted_order(rng, binning, schedule):
    key = rng.normal(size=50)
    key[[3, 17]] = np.nan  # texts with no scored token
    cur = build_curriculum(key, 3, binning, schedule)
    members = [cur.members(b) for b in range(3)]
    flat = np.concatenate(members)
    assert sorted(flat.tolist()) == sorted(set(range(50)) - {3, 17})  # each keyed text exactly once
    assert cur.excluded.tolist() == [3, 17]
    for b, m in enumerate(members):  # sorted within bins, and bins ordered by key
        k = key[m]
        assert np.all(np.diff(k) <= 0) if schedule == "decreasing" else np.all(np.diff(k) >= 0)
        if b:
            assert key[members[b - 1]].max() <= k.min()
    if binning == "count":
        assert max(cur.counts) - min(cur.counts) <= 1
    else:
        assert np.allclose(np.diff(cur.edges), np.diff(cur.edges)[0])
    read_order = np.concatenate([cur.members(b) for b in cur.schedule])
    if schedule != [2, 0, 1]:  # reading shards in schedule order reads the corpus sorted
        assert np.all(np.diff(key[read_order]) >= 0) == (schedule == "increasing")


def test_linear_key_and_standardisation():
    a, b = np.array([1.0, 2.0, 3.0, np.nan]), np.array([10.0, 0.0, 20.0, 5.0])
    assert np.allclose(combine_key([(a, 1.0), (b, -0.5)])[:3], [-4.0, 2.0, -7.0])
    assert np.isnan(combine_key([(a, 1.0), (b, -0.5)])[3])
    z = combine_key([(a, 1.0), (b, 1.0)], standardize=True)[:3]
    za, zb = (a[:3] - 2) / a[:3].std(), (b[:3] - 10) / b[:3].std()
    assert np.allclose(z, za + zb)


# ---------------------------------------------------------------------------- comparison
def test_comparison_matches_scipy_and_an_eigendecomposition(rng):
    from scipy import stats

    base = rng.normal(size=40)
    X = np.vstack([base, base + 0.3 * rng.normal(size=40), -base + rng.normal(size=40)])
    res = compare_models(X, ["a", "b", "c"], "entropy_mean", "rmse")
    assert np.allclose(res.spearman, stats.spearmanr(X.T).statistic)
    assert res.kendall[0, 2] == pytest.approx(stats.kendalltau(X[0], X[2]).statistic)
    assert res.distance[0, 1] == pytest.approx(np.sqrt(np.mean((X[0] - X[1]) ** 2)))
    # PCA of the models: eigen-decomposition of the M x M Gram matrix of the centred rows
    Xc = X - X.mean(0)
    ev = np.sort(np.linalg.eigvalsh(Xc @ Xc.T))[::-1][:2]
    assert np.allclose(res.pca.explained_variance, ev / 2)
    assert res.pca.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.allclose(np.linalg.norm(res.pca.coords, axis=1), np.linalg.norm(Xc, axis=1))


def test_a_model_compared_with_itself(rng):
    x = rng.normal(size=30)
    res = compare_models(np.vstack([x, x]), ["m", "m2"], "entropy_mean", "one_minus_spearman")
    assert res.spearman[0, 1] == pytest.approx(1.0, abs=1e-12) and res.kendall[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert res.distance[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(pca(np.vstack([x, x])).coords, 0)


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llama, char_tok):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_llama.save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


def corpus(tmp_path, texts=TEXTS) -> str:
    p = tmp_path / "corpus.jsonl"
    p.write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t, "extra": i}) + "\n" for i, t in enumerate(texts))
        + json.dumps({"id": "empty", "text": ""})
        + "\n"
    )
    return str(p)


def cfg_dict(tmp_path, checkpoint, **sections) -> dict:
    raw = {
        "models": [{"name": "a", "path": str(checkpoint)}, {"name": "b", "path": str(checkpoint)}],
        "data": {"path": corpus(tmp_path)},
        "engine": {"chunk_texts": 3, "token_budget": 64},
        "curriculum": {"bins": 3, "key": "entropy_mean"},
        "output": {"dir": str(tmp_path / "out"), "plots": False},
    }
    raw.update(sections)
    return raw


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_writes_shards_manifest_schedule_and_plots(tmp_path, checkpoint):
    raw = cfg_dict(tmp_path, checkpoint, output={"dir": str(tmp_path / "ignored"), "plots": True})
    (tmp_path / "cfg.yaml").write_text(json.dumps(raw))  # JSON is YAML
    out = tmp_path / "cli"
    assert main([str(tmp_path / "cfg.yaml"), "--out", str(out), "--set", "models.1.temperature=0.7"]) == 0
    stats = read_jsonl(out / "models" / "a" / "stats.jsonl")
    assert [r["id"] for r in stats] == [f"t{i}" for i in range(len(TEXTS))] + ["empty"]
    manifest = json.loads((out / "curriculum" / "manifest.json").read_text())
    assert manifest["excluded_ids"] == ["empty"] and sum(manifest["counts"]) == len(TEXTS)
    shards = [
        read_jsonl(out / "curriculum" / s)
        for s in json.loads((out / "curriculum" / "schedule.json").read_text())["shards"]
    ]
    ids = [r["id"] for s in shards for r in s]
    assert sorted(ids) == sorted(f"t{i}" for i in range(len(TEXTS)))  # the corpus, each text once
    key = {r["id"]: r["entropy_mean"] for r in stats}
    assert [key[i] for i in ids] == sorted(key[i] for i in ids)  # increasing schedule: sorted throughout
    assert all("extra" in r for s in shards for r in s)  # shards keep the rows' own fields
    for name in ("sorted_entropy_mean", "rank_scatter", "distance", "pca", "curriculum"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["b"]["temperature"] == 0.7 and summary["comparison"]["spearman"]["a"]["b"] < 1
    assert summary["models"]["a"]["throughput"]["tokens_per_s"] > 0


def test_identical_models_correlate_perfectly_at_distance_zero(tmp_path, checkpoint):
    summary = score(load_score_config(cfg_dict(tmp_path, checkpoint, curriculum=None)))
    c = summary["comparison"]
    assert c["spearman"]["a"]["b"] == pytest.approx(1.0, abs=1e-12)
    assert c["kendall"]["a"]["b"] == pytest.approx(1.0, abs=1e-12)
    assert c["distance"]["matrix"]["a"]["b"] == 0.0


def test_interrupted_run_resumes_without_rescoring(tmp_path, checkpoint, monkeypatch):
    cfg = load_score_config(cfg_dict(tmp_path, checkpoint, models=[{"name": "a", "path": str(checkpoint)}]))
    scored, real = [], scorer_mod.score_records

    def counting(model, engine, encoded):
        if len(scored) >= 6:  # two chunks of 3 texts done: die inside the third
            raise KeyboardInterrupt
        scored.extend(encoded)
        return real(model, engine, encoded)

    monkeypatch.setattr(scorer_mod, "score_records", counting)
    with pytest.raises(KeyboardInterrupt):
        score(cfg)
    path = tmp_path / "out" / "models" / "a" / "stats.jsonl"
    assert len(read_jsonl(path)) == 6
    with open(path, "a") as f:
        f.write('{"index": 6, "id": "t6", "n_tok')  # a torn write: cut off on resume
    scored.clear()
    monkeypatch.setattr(scorer_mod, "score_records", lambda m, e, enc: (scored.extend(enc), real(m, e, enc))[1])
    score(cfg)
    assert len(scored) == len(TEXTS) - 6  # only the unfinished texts ("empty" needs no forward)
    resumed = read_jsonl(path)
    scored.clear()
    fresh = score(
        load_score_config(cfg_dict(tmp_path, checkpoint, models=[{"name": "a", "path": str(checkpoint)}])),
        tmp_path / "fresh",
    )
    assert len(scored) == len(TEXTS) and fresh["models"]["a"]["n_texts"] == len(TEXTS)
    assert resumed == read_jsonl(tmp_path / "fresh" / "models" / "a" / "stats.jsonl")
    scored.clear()
    score(cfg)  # all done: nothing is scored, nothing is loaded
    assert scored == []


def test_changed_model_settings_are_refused(tmp_path, checkpoint, capsys):
    raw = cfg_dict(tmp_path, checkpoint, compare=None, curriculum=None, models=[{"name": "a", "path": str(checkpoint)}])
    score(load_score_config(raw))
    raw["models"][0]["temperature"] = 0.5
    (tmp_path / "cfg.yaml").write_text(json.dumps(raw))
    assert main([str(tmp_path / "cfg.yaml")]) == 2
    assert "holds scores of other settings" in capsys.readouterr().err


# ---------------------------------------------------------------------------- config errors
BASE = {"models": [{"path": "smollm2-135m-instruct"}], "data": {"path": "builtin:score_demo"}}
BAD = [
    ({"models": [{"path": "m", "temperature": 0}]}, r"models\.0\.temperature: temperature must be > 0; got 0"),
    ({"models": [{"path": "m", "colour": 1}]}, r"models\.0\.colour: unknown key\. Valid keys here: .*temperature"),
    ({"models": []}, r"models: List should have at least 1 item"),
    ({"models": [{"path": "m"}, {"path": "m"}]}, r"model names \['m'\] repeat: .*models\.N\.name"),
    ({"data": {"path": "x", "wrap": "system"}}, r"data\.wrap: .*'none', 'user' or 'assistant'"),
    ({"data": {"path": "x", "prefix": "token"}}, r"data: prefix: token needs data\.prefix_token"),
    ({"engine": {"chunk_texts": 0}}, r"engine\.chunk_texts: .*greater than or equal to 1"),
    ({"curriculum": {"key": "perplexity"}}, r"curriculum\.key: 'perplexity' is not a statistic"),
    ({"curriculum": {"key": {"entropy_mean": 1, "nll_mean@other": -1}}}, r"curriculum\.key: model 'other'"),
    ({"curriculum": {"model": "other"}}, r"curriculum\.model 'other' is none of the models"),
    ({"curriculum": {"bins": 3, "schedule": [0, 1, 1]}}, r"curriculum\.schedule \[0, 1, 1\] is not a permutation"),
    ({"curriculum": {"binning": "quantile"}}, r"curriculum\.binning: .*'count' or 'width'"),
    ({"compare": {"stat": "loss"}}, r"compare\.stat 'loss' is not a statistic"),
    ({"compare": {"bogus": 1}}, r"compare\.bogus: unknown key\. Valid keys here: distance, stat"),
]


@pytest.mark.parametrize("patch,pattern", BAD, ids=[p.split(":")[0].replace("\\", "")[:40] for _, p in BAD])
def test_config_errors_name_the_key_path(patch, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_score_config({**BASE, **patch})
    assert str(err.value).count("\n") == 1  # one problem, one line


def test_overrides_reach_into_the_models_list():
    cfg = load_score_config(
        {**BASE, "models": [{"path": "m"}, {"path": "m", "name": "x"}]},
        ["models.1.temperature=0.7", "curriculum.key={entropy_mean: 1, nll_mean@x: -1}"],
    )
    assert cfg.models[1].temperature == 0.7 and cfg.names == ("m", "x")
    with pytest.raises(ConfigError, match=r"models\.0\.temperature"):
        load_score_config(BASE, ["models.0.temperature=-1"])
