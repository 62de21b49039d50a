"""Token-level diagnostics: the batched statistics against a naive per-position full softmax,
the classes on hand-built distributions, identical models, teacher forcing, outputs."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, Rollouts
from isdelta.tokens import TokenComparison, TokenOptions, TokenThresholds, classify, compare_tokens
from isdelta.tokens.positions import parse_positions, row_pieces, select_positions
from isdelta.tokens.report import markdown_lines, md_token
from isdelta.tokens.stats import position_stats

PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12], [1, 13]]
TRANSFORM = LogitTransform(temperature=0.7, top_k=12, top_p=0.8)


@pytest.fixture(scope="module")
def rollouts() -> Rollouts:
    """Four rows of random completions, two ending in EOS (id 2), of different lengths."""
    g = torch.Generator().manual_seed(0)
    comps = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 11, 3, 8)]
    comps[0].append(2)
    comps[2].append(2)
    return Rollouts.from_token_lists(PROMPTS, comps, eos_token_ids=2, pad_token_id=2)


@pytest.fixture(scope="module")
def model_b(tiny_llama):
    """tiny_llama moved a little in every parameter (an "update")."""
    m = copy.deepcopy(tiny_llama)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m


# ---------------------------------------------------------------------------- naive reference
def naive_logits(model, rollouts: Rollouts) -> dict[tuple[int, int], torch.Tensor]:
    """Full-model logits [V] (float64) at every counted position, one unpadded row at a time."""
    out, mask = {}, rollouts.mask(True)
    for r in range(rollouts.n_rows):
        pl, L = int(rollouts.prompt_lengths[r]), int(mask[r].sum())
        ids = torch.cat([rollouts.prompt_ids[r, -pl:], rollouts.completion_ids[r, :L]])[None]
        with torch.no_grad():
            logits = model(ids).logits[0].double()  # [T, V]
        for c in range(L):
            out[(r, c)] = logits[pl - 1 + c]
    return out


def hf_transform(logits: torch.Tensor, t: LogitTransform) -> torch.Tensor:
    """The sampling transform by HF's own warpers (an external implementation)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = TemperatureLogitsWarper(t.temperature)(None, logits[None].float())
    x = TopKLogitsWarper(t.top_k)(None, x)
    return TopPLogitsWarper(t.top_p)(None, x)[0].double()


def naive_view(logits: torch.Tensor, token: int, k: int, top_p: float, tail_k: int) -> dict:
    """One position's statistics by a full softmax and an explicit loop."""
    p = torch.softmax(logits, -1)
    ps, ids = torch.sort(p, descending=True)
    lp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    H = float(-(p * lp).sum())
    n, cum = 0, 0.0
    while cum < top_p and n < int((p > 0).sum()):
        cum += float(ps[n])
        n += 1
    return {
        "entropy": H,
        "varentropy": float((p * (lp + H) ** 2).sum()),
        "chosen_p": float(p[token]),
        "top1_p": float(ps[0]),
        "topk_p": ps[:k].numpy(),
        "topk_id": ids[:k].numpy(),
        "nucleus": n,
        "tail": float(ps[tail_k:].sum()),
        "p": p,
    }


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    if ((p > 0) & (q == 0)).any():
        return float("inf")
    m = p > 0
    return float((p[m] * (p[m].log() - q[m].log())).sum())


@pytest.mark.parametrize(
    "chunk_elems,token_budget", [(2**23, 16384), (96 * 8 * 3, 20)], ids=["one-chunk", "many-chunks-and-micro-batches"]
)
def test_statistics_equal_a_naive_per_position_softmax(tiny_llama, model_b, rollouts, chunk_elems, token_budget):
    opts = {
        "top_k": 5,
        "top_p": 0.9,
        "tail_k": 20,
        "transform": TRANSFORM,
        "chunk_elems": chunk_elems,
        "token_budget": token_budget,
        "progress": False,
    }
    res = compare_tokens(tiny_llama, model_b, rollouts, **opts)
    la, lb = naive_logits(tiny_llama, rollouts), naive_logits(model_b, rollouts)
    assert [(int(r), int(c)) for r, c in zip(res["row"], res["step"])] == sorted(la)  # "all" = every counted
    t = res.table
    for i, key in enumerate(sorted(la)):
        token = int(rollouts.completion_ids[key])
        for suffix, view in (("", lambda x: x), ("_trunc", lambda x: hf_transform(x, TRANSFORM))):
            a = naive_view(view(la[key]), token, 5, 0.9, 20)
            b = naive_view(view(lb[key]), token, 5, 0.9, 20)
            for m, ref in (("a", a), ("b", b)):
                for stat in ("entropy", "varentropy"):
                    assert t[f"{m}_{stat}{suffix}"][i] == pytest.approx(ref[stat], abs=2e-5), (key, m, stat, suffix)
                for stat in ("chosen_p", "top1_p", "tail"):
                    assert t[f"{m}_{stat}{suffix}"][i] == pytest.approx(ref[stat], abs=1e-6), (key, m, stat, suffix)
                assert t[f"{m}_nucleus{suffix}"][i] == ref["nucleus"], (key, m, suffix)
                np.testing.assert_allclose(t[f"{m}_topk_p{suffix}"][i], ref["topk_p"], atol=1e-6)
                if not suffix:
                    np.testing.assert_array_equal(t[f"{m}_topk_id"][i], ref["topk_id"])
            assert t[f"b_p_a_top1{suffix}"][i] == pytest.approx(float(b["p"][a["topk_id"][0]]), abs=1e-6)
            for name, p, q in (("kl_ab", a["p"], b["p"]), ("kl_ba", b["p"], a["p"])):
                ref = naive_kl(p, q)
                if np.isinf(ref):
                    assert np.isposinf(t[f"{name}{suffix}"][i]), (key, name, suffix)
                else:
                    assert t[f"{name}{suffix}"][i] == pytest.approx(ref, abs=2e-5), (key, name, suffix)
    assert not any(np.isnan(v).any() for v in t.values() if v.dtype.kind == "f")
    assert np.isinf(t["kl_ab_trunc"]).any()  # the truncated supports differ somewhere: inf is reported


# ---------------------------------------------------------------------------- classes
def _stats_of(p_rows: list[np.ndarray], top_p: float = 0.9, tail_k: int = 20) -> dict:
    logits = torch.log(torch.tensor(np.array(p_rows), dtype=torch.float32))
    opts = TokenOptions(top_p=top_p, tail_k=tail_k)
    return {
        k: v.numpy()
        for k, v in position_stats(logits, logits, torch.zeros(len(p_rows), dtype=torch.long), opts).items()
    }


def _dist(head: list[float], V: int = 96) -> np.ndarray:
    """``head`` then the remaining mass spread evenly over the other V − len(head) tokens."""
    rest = (1 - sum(head)) / (V - len(head))
    return np.array(head + [rest] * (V - len(head)))


def test_hand_built_distributions_get_the_documented_class():
    rows = {
        "lock": _dist([0.97, 0.01, 0.005]),  # one token, a small distractor tail
        "fork": _dist([0.45, 0.40, 0.10]),  # two continuations of similar weight
        "diffuse": np.full(96, 1 / 96),  # mass beyond the top 20: 76/96
        "mixed": _dist([0.70, 0.10, 0.08, 0.05]),
    }  # a favourite, but no lock
    s = _stats_of(list(rows.values()))
    got = classify(s["a_top1_p"], s["a_top2_p"], s["a_nucleus"], s["a_tail"])
    assert list(got) == list(rows)
    assert s["a_nucleus"][0] == 1 and s["a_nucleus"][1] == 3 and s["a_tail"][2] == pytest.approx(76 / 96)
    # thresholds move the boundaries: a stricter lock makes the first row mixed
    assert (
        classify(
            s["a_top1_p"][:1], s["a_top2_p"][:1], s["a_nucleus"][:1], s["a_tail"][:1], TokenThresholds(lock_top1=0.99)
        )[0]
        == "mixed"
    )


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match=r"thresholds\.lock_top1 must lie in \[0, 1\]"):
        TokenThresholds(lock_top1=1.5)
    with pytest.raises(ValueError, match=r"thresholds\.fork_nucleus must be a positive number"):
        TokenThresholds(fork_nucleus=0)


@pytest.fixture(scope="module")
def sharp(tiny_llama):
    """tiny_llama with a 10× sharper head: most positions are locks."""
    m = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        m.lm_head.weight.mul_(10.0)
    return m


def test_identical_models_give_zero_deltas_and_strict_locks(sharp, rollouts):
    res = compare_tokens(sharp, copy.deepcopy(sharp), rollouts, transform=TRANSFORM, progress=False)
    t = res.table
    for s in ("", "_trunc"):
        for k in ("kl_ab", "kl_ba", "entropy_delta", "top1_delta", "nucleus_delta", "tail_delta"):
            assert (t[f"{k}{s}"] == 0).all(), k + s  # exactly: same logits, same arithmetic
    locks = t["a_class"] == "lock"
    assert locks.sum() >= 5 and (t["lock_type"][locks] == "strict").all() and (t["lock_type"][~locks] == "").all()
    assert (t["a_class"] == t["b_class"]).all() and t["top1_same"].all()
    cats = {r["category"]: r for r in res.categories()}
    assert cats["lock/swap"]["n"] == 0 and cats["lock/strict"]["n"] == locks.sum()
    assert cats["all"]["kl_ab_trunc"] == 0.0 and cats["all"]["n_inf_trunc"] == 0


# ---------------------------------------------------------------------------- positions
def test_position_specs_select_subsets_of_the_counted_mask(rollouts, tiny_llama, model_b):
    counted = rollouts.mask(True).numpy()
    every = select_positions(counted, "every:3")
    assert (every <= counted).all() and set(np.nonzero(every)[1] % 3) == {0}
    assert every.sum() == sum(len(range(0, L, 3)) for L in counted.sum(1))
    r1, r2 = (select_positions(counted, "random:7", seed=s) for s in (0, 0))
    assert r1.sum() == 7 and (r1 <= counted).all() and (r1 == r2).all()
    assert (select_positions(counted, "random:1000") == counted).all()  # all when fewer
    res = compare_tokens(tiny_llama, model_b, rollouts, positions="every:3", include_eos=False, progress=False)
    no_eos = rollouts.mask(False).numpy()
    assert no_eos[res["row"], res["step"]].all() and len(res) == (no_eos & every).sum()
    for bad in ("every", "every:0", "random:x", "sometimes", "pattern:3"):
        with pytest.raises(ValueError, match="positions"):
            parse_positions(bad)


def test_pattern_positions_surround_the_markers():
    text = "So x=2. Wait, no: \\boxed{3}"
    pieces = [list(text)]  # one char per token
    counted = np.ones((1, len(text)), dtype=bool)
    sel = select_positions(counted, "pattern", pieces=pieces, window=1, n_random=0)
    wait, boxed = text.index("Wait"), text.index("\\boxed")
    expected = np.zeros(len(text), dtype=bool)
    expected[wait - 1 : wait + 5] = True
    expected[boxed - 1 : boxed + 7] = True
    np.testing.assert_array_equal(sel[0], expected)
    more = select_positions(counted, "pattern", pieces=pieces, window=1, n_random=3, seed=1)
    assert (more >= sel).all() and more.sum() == sel.sum() + 3
    with pytest.raises(ValueError, match="pass the tokenizer"):
        select_positions(counted, "pattern")
    with pytest.raises(ValueError, match="patterns: '\\(' is not a valid regular expression"):
        select_positions(counted, "pattern", pieces=pieces, patterns=["("])


def test_pattern_and_self_correction_on_decoded_text(char_tok, tiny_llama, model_b):
    prompt = char_tok("Q:")["input_ids"]
    comps = [
        char_tok(s, add_special_tokens=False)["input_ids"] + [2]
        for s in ("abc Wait, 7 is right", "no markers here at all")
    ]
    ro = Rollouts.from_token_lists([prompt, prompt], comps, eos_token_ids=2, pad_token_id=2)
    res = compare_tokens(
        tiny_llama, model_b, ro, tokenizer=char_tok, positions="pattern", window=0, n_random=0, progress=False
    )
    assert set(res["row"]) == {0} and "".join(res.text(i) for i in res["token_id"]) == "Wait"
    full = compare_tokens(tiny_llama, model_b, ro, tokenizer=char_tok, self_correction_tokens=6, progress=False)
    flagged = full.table["self_correction"]
    start = len("abc Wait")  # the 6 tokens before position c hold a whole "Wait" for c in 8, 9, 10
    assert list(np.flatnonzero(flagged)) == [start, start + 1, start + 2]
    assert full["context"][start] == "abc Wait"[-24:]


# ---------------------------------------------------------------------------- teacher forcing
def test_teacher_forced_scores_exactly_the_response_tokens(char_tok, tiny_llama, model_b):
    from isdelta.run.config import load_config
    from isdelta.run.data import sft_rollouts

    records = [
        {"prompt": [{"role": "user", "content": "1+1="}], "response": "2, surely"},
        {"prompt": [{"role": "user", "content": "name a colour"}], "response": "red"},
    ]
    cfg = load_config({"model": {"path": "x"}, "data": {"path": "x"}, "update": {"loss": "sft"}})
    ro = sft_rollouts(char_tok, records, cfg)
    for include_eos in (True, False):
        res = compare_tokens(tiny_llama, model_b, ro, tokenizer=char_tok, include_eos=include_eos, progress=False)
        mask = ro.mask(include_eos)
        rows, cols = mask.nonzero(as_tuple=True)
        np.testing.assert_array_equal(res["row"], rows.numpy())
        np.testing.assert_array_equal(res["step"], cols.numpy())
        text = ["".join(res.text(i) for i in res["token_id"][res["row"] == r]) for r in range(2)]
        assert text == (["2, surely</s>", "red</s>"] if include_eos else ["2, surely", "red"])
        # the chosen-token probability is the engine's, at the engine's positions
        s0 = LogProbEngine(EngineConfig(include_eos=include_eos, progress=False)).score(tiny_llama, ro)
        np.testing.assert_allclose(res["a_chosen_p"], s0.token_logp[mask].exp().numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------- outputs
def test_csv_markdown_and_aggregates(tmp_path, char_tok, tiny_llama, model_b):
    prompt = char_tok("Q:")["input_ids"]
    comps = [char_tok(s, add_special_tokens=False)["input_ids"] + [2] for s in ("ab\nc", "xyz")]
    ro = Rollouts.from_token_lists([prompt, prompt], comps, eos_token_ids=2, pad_token_id=2)
    res = compare_tokens(
        tiny_llama, model_b, ro, tokenizer=char_tok, carrier="refs", transform=TRANSFORM, progress=False
    )
    both = TokenComparison.concat([res, res.subset(res["row"] == 1)])
    path = tmp_path / "tokens.csv"
    both.to_csv(path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(both) == 5 + 4 + 4
    assert rows[2]["token"] == "\n" and rows[4]["token"] == "</s>" and rows[0]["carrier"] == "refs"
    assert float(rows[0]["a_entropy"]) == pytest.approx(float(res["a_entropy"][0]), rel=1e-5)
    assert {"a_rank1_token", "b_rank5_p_trunc", "kl_ab_trunc", "context"} <= set(rows[0])
    lines = markdown_lines(res, ("p0", "p1"), n_interesting=3)
    md = "\n".join(lines)
    assert "| rank | p0 token (prob) | p1 token (prob) |" in md and "### The 3 most changed positions" in md
    assert md_token("a|b\n c") == "`a\\|b\\n␣c`"
    cats = {r["category"]: r for r in res.categories()}
    assert sum(cats[c]["n"] for c in ("lock", "fork", "diffuse", "mixed")) == cats["all"]["n"] == len(res)
    # a position met on two carriers (same prefix) is listed once among the most changed
    twice = TokenComparison.concat(
        [res, TokenComparison({**res.table, "carrier": res["carrier"] + "2"}, res.vocab, res.options)]
    )
    np.testing.assert_array_equal(twice.interesting(4), res.interesting(4))
    d = res.to_dict()
    assert d["carriers"]["refs"]["headline"]["n"] == len(res)
    import json

    json.dumps(d, allow_nan=False)  # inf KLs become "inf", never NaN


def test_an_empty_selection_gives_an_empty_table(char_tok, tiny_llama, model_b, tmp_path):
    prompt = char_tok("Q:")["input_ids"]
    ro = Rollouts.from_token_lists(
        [prompt], [char_tok("abc", add_special_tokens=False)["input_ids"]], eos_token_ids=2, pad_token_id=2
    )
    res = compare_tokens(tiny_llama, model_b, ro, tokenizer=char_tok, positions="pattern", n_random=0, progress=False)
    assert len(res) == 0 and res["a_topk_p"].shape == (0, 5)
    res.to_csv(tmp_path / "t.csv")
    assert markdown_lines(res)[0].startswith("## Token-level")


def test_bad_options_say_what_to_fix(tiny_llama, model_b, rollouts):
    with pytest.raises(TypeError, match="unknown option.*topk.*valid: positions"):
        compare_tokens(tiny_llama, model_b, rollouts, topk=3)
    with pytest.raises(ValueError, match="top_k = 500 exceeds the vocabulary"):
        compare_tokens(tiny_llama, model_b, rollouts, top_k=500, progress=False)
    with pytest.raises(ValueError, match="top_p must lie in"):
        TokenOptions(top_p=0)


def test_row_pieces_decode_each_id_once():
    calls = []
    pieces = row_pieces(np.array([[5, 6, 5, 0], [6, 0, 0, 0]]), np.array([3, 1]), lambda i: calls.append(i) or f"<{i}>")
    assert pieces == [["<5>", "<6>", "<5>"], ["<6>"]] and sorted(calls) == [5, 6]


@pytest.mark.slow
def test_pattern_positions_on_smollm2_tokens(smollm2):
    """Real byte-level BPE pieces: the markers are found, and a model against itself moves nothing."""
    model, tok = smollm2
    prompt = tok("What is 2 + 3?")["input_ids"]
    comp = tok("Let me see. 2 + 3 = 6. Wait, that is wrong: \\boxed{5}", add_special_tokens=False)["input_ids"]
    ro = Rollouts.from_token_lists(
        [prompt], [comp + [tok.eos_token_id]], eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    res = compare_tokens(model, model, ro, tokenizer=tok, positions="pattern", window=0, n_random=0, progress=False)
    marked = "".join(res.text(i) for i in res["token_id"])
    assert "Let" in marked and "Wait" in marked and "\\boxed" in marked and "see" not in marked
    assert (res["kl_ab"] == 0).all() and (res["top1_delta"] == 0).all()
    full = compare_tokens(model, model, ro, tokenizer=tok, progress=False)
    wait = int(np.flatnonzero(np.array([full.text(i) for i in full["token_id"]]) == " Wait")[0])
    assert full["self_correction"][wait + 1] and not full["self_correction"][:wait].any()
