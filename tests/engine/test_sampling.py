"""sample() against HF generate's own scores, a naive stop-string scan, and itself (seeds, saving)."""

from __future__ import annotations

import warnings

import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine
from isdelta.engine.samples import Samples
from isdelta.engine.sampling import _prompt_batches, sample

PROMPTS = ["hello", [{"role": "user", "content": "2+2?"}], "abc def"]
TOL = 1e-4  # fp32; generate runs the full model with a KV cache, the engine body + head


def draw(model, tok, **kw) -> Samples:
    kw = {"num_samples": 4, "transform": LogitTransform(), "max_new_tokens": 12, "seed": 0, "progress": False, **kw}
    return sample(model, tok, kw.pop("prompts", PROMPTS), **kw)


def capture_generate(model, monkeypatch) -> list[dict]:
    """Wrap model.generate: record its kwargs and the processed scores it sampled from."""
    calls, orig = [], model.generate

    def generate(*args, **kwargs):
        calls.append(dict(kwargs))
        out = orig(*args, **{**kwargs, "output_scores": True, "return_dict_in_generate": True})
        calls[-1].update(scores=out.scores, sequences=out.sequences)
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_token_id_prompts_sample_as_the_text_they_encode(tiny_llama, char_tok):
    """A trainer's prompt tokens (list of int, or a tensor) are fed as they are: the same rows,
    the same tokens, as the text prompts they came from, under the same seed."""
    by_text = draw(tiny_llama, char_tok)
    ids = [r.prompt_ids[0][r.attention_mask[0, : r.prompt_len].bool()] for r in
           (by_text.rollouts.select(torch.tensor([4 * p])) for p in range(3))]  # fmt: skip
    by_ids = draw(tiny_llama, char_tok, prompts=[ids[0].tolist(), ids[1], ids[2].tolist()])
    assert torch.equal(by_ids.rollouts.completion_ids, by_text.rollouts.completion_ids)
    assert torch.equal(by_ids.rollouts.prompt_ids, by_text.rollouts.prompt_ids)
    assert by_ids.texts == by_text.texts
    with pytest.raises(ValueError, match="prompt 1 must be a str, a list of"):
        draw(tiny_llama, char_tok, prompts=[[1, 2], [1.5, 2]])


def test_rows_are_prompt_major(tiny_llama, char_tok):
    s = draw(tiny_llama, char_tok)
    ro, G = s.rollouts, 4
    assert ro.n_rows == s.n_rows == 12 and s.n_prompts == 3
    assert ro.group.tolist() == [r // G for r in range(12)]
    chat = char_tok.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert s.prompt_texts == ("hello", chat, "abc def")
    encoded = [
        char_tok("hello")["input_ids"],
        char_tok(chat, add_special_tokens=False)["input_ids"],
        char_tok("abc def")["input_ids"],
    ]
    for r in range(12):
        real = ro.prompt_ids[r][ro.attention_mask[r, : ro.prompt_len].bool()].tolist()
        assert real == encoded[r // G]
    # the stop reasons agree with the layout: EOS rows end with a counted stop token
    assert [x == "eos" for x in s.stop_reason] == ro.stopped.tolist()
    assert s.stopped.tolist() == [x != "length" for x in s.stop_reason]
    assert all(L == 12 for L, x in zip(ro.lengths.tolist(), s.stop_reason) if x == "length")
    recs = s.to_records()
    assert [(r["prompt"], r["sample"]) for r in recs] == [(r // G, r % G) for r in range(12)]
    assert s.to_dict()["n_rows"] == 12


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(temperature=0.8, top_k=20, top_p=0.9)], ids=str)
def test_engine_scores_equal_generate_scores(tiny_llama, char_tok, monkeypatch, transform):
    """log p of each sampled token under the engine = log_softmax of the scores generate sampled from."""
    calls = capture_generate(tiny_llama, monkeypatch)
    s = draw(tiny_llama, char_tok, transform=transform, stop_strings=("e",))
    assert len(calls) == 1
    scores = torch.stack(calls[0]["scores"], 1).log_softmax(-1)  # [N, n_steps, V]
    comp = s.rollouts.completion_ids  # [N, C]
    ref = scores.gather(-1, comp[:, : scores.shape[1], None]).squeeze(-1)  # [N, n_steps]
    ours = LogProbEngine(EngineConfig.from_transform(transform, progress=False)).score(tiny_llama, s.rollouts)
    m = ours.mask[:, : scores.shape[1]]
    assert ours.mask.sum() == m.sum() > 0
    torch.testing.assert_close(ours.token_logp[:, : scores.shape[1]][m], ref[m], atol=TOL, rtol=TOL)


def test_generation_config_does_not_leak(tiny_llama, char_tok, monkeypatch):
    """top_k=50, a repetition penalty, min-p and typical-p in generation_config are overridden."""
    gc = tiny_llama.generation_config
    for k, v in {
        "top_k": 50,
        "repetition_penalty": 1.5,
        "min_p": 0.2,
        "typical_p": 0.5,
        "no_repeat_ngram_size": 1,
    }.items():
        monkeypatch.setattr(gc, k, v)
    calls = capture_generate(tiny_llama, monkeypatch)
    with pytest.warns(UserWarning, match="overridden to neutral"):
        s = draw(tiny_llama, char_tok)
    kw = calls[0]
    assert kw["top_k"] == 0 and kw["repetition_penalty"] == 1.0 and kw["min_p"] is None
    assert kw["typical_p"] == 1.0 and kw["no_repeat_ngram_size"] == 0 and kw["do_sample"] is True
    scores = torch.stack(kw["scores"], 1)  # [N, n_steps, V]
    assert torch.isfinite(scores).all(), "a truncating processor leaked into generate"
    ref = scores.log_softmax(-1).gather(-1, s.rollouts.completion_ids[:, : scores.shape[1], None]).squeeze(-1)
    ours = LogProbEngine(progress=False).score(tiny_llama, s.rollouts)
    m = ours.mask[:, : scores.shape[1]]
    torch.testing.assert_close(ours.token_logp[:, : scores.shape[1]][m], ref[m], atol=TOL, rtol=TOL)


def naive_trim(tokens, tok, stop_strings, eos=2):
    """Linear scan: the first prefix whose decoded text holds a stop string, else up to the first EOS."""
    for t, x in enumerate(tokens):
        if x == eos:
            return tokens[: t + 1], "eos"
        if any(s in tok.decode(tokens[: t + 1], skip_special_tokens=False) for s in stop_strings):
            return tokens[: t + 1], "stop_string"
    return tokens, "length"


def test_stop_strings_trim_at_the_earliest_prefix(tiny_llama, char_tok):
    free = draw(tiny_llama, char_tok, max_new_tokens=16, seed=5)
    long_rows = [r for r, x in enumerate(free.stop_reason) if x == "length"]
    assert long_rows, "need an untrimmed row to pick a stop string from"
    two = free.texts[long_rows[0]][5:7]  # a two-token stop string that occurs mid-completion
    stops = (two, "Q")
    cut = draw(tiny_llama, char_tok, max_new_tokens=16, seed=5, stop_strings=stops)
    raw = free.rollouts.completion_ids.tolist()
    reasons = []
    for r in range(free.n_rows):
        kept, reason = naive_trim(raw[r][: int(free.rollouts.completion_lengths[r])], char_tok, stops)
        got = cut.rollouts.completion_ids[r, : int(cut.rollouts.completion_lengths[r])].tolist()
        assert (got, cut.stop_reason[r]) == (kept, reason), r
        reasons.append(reason)
        if reason == "stop_string":  # no EOS kept, every kept token counts (DESIGN.md §3)
            assert int(cut.rollouts.lengths[r]) == len(kept) and not bool(cut.rollouts.stopped[r])
            assert cut.texts[r].endswith(stops) and cut.stopped[r]
    assert "stop_string" in reasons and set(reasons) != {"stop_string"}


def test_seed_reproduces_and_restores_caller_rng(tiny_llama, char_tok):
    torch.manual_seed(123)
    a = draw(tiny_llama, char_tok, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3)), "sample() must not consume the caller's RNG"
    b = draw(tiny_llama, char_tok, seed=7)
    c = draw(tiny_llama, char_tok, seed=8)
    assert torch.equal(a.rollouts.input_ids, b.rollouts.input_ids) and a.texts == b.texts
    assert not torch.equal(a.rollouts.input_ids, c.rollouts.input_ids)


def test_micro_batches_keep_the_layout(tiny_llama, char_tok):
    one = draw(tiny_llama, char_tok, prompt_batch_size=1)
    assert one.rollouts.group.tolist() == [r // 4 for r in range(12)]
    assert _prompt_batches(
        [3, 5, 2, 4], G=2, max_new_tokens=4, prompt_batch_size=None, token_budget=2 * 2 * (5 + 4)
    ) == [[0, 1], [2, 3]]
    assert _prompt_batches([3, 5, 2], G=2, max_new_tokens=4, prompt_batch_size=2, token_budget=1) == [[0, 1], [2]]


def test_save_load_round_trip(tiny_llama, char_tok, tmp_path):
    s = draw(tiny_llama, char_tok, transform=LogitTransform(temperature=0.9, top_k=30), stop_strings=("e",))
    path = tmp_path / "run" / "samples.pt"
    s.save(path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    t = Samples.load(path)
    for name in ("input_ids", "attention_mask", "completion_mask", "group"):
        assert torch.equal(getattr(s.rollouts, name), getattr(t.rollouts, name))
    for name in ("prompt_len", "eos_token_ids"):
        assert getattr(t.rollouts, name) == getattr(s.rollouts, name)
    for name in ("texts", "prompt_texts", "stop_reason", "transform", "seed", "stop_strings"):
        assert getattr(t, name) == getattr(s, name)
    assert t.to_dict() == s.to_dict()
    # a .json from another save (a run killed between the two writes) is refused
    other = tmp_path / "other.pt"
    s.save(other)
    other.with_suffix(".json").replace(path.with_suffix(".json"))
    with pytest.raises(ValueError, match="same save"):
        Samples.load(path)
    with pytest.raises(ValueError, match=r"\.pt"):
        s.save(tmp_path / "samples.json")


def test_bad_inputs(tiny_llama, char_tok):
    with pytest.raises(ValueError, match="non-empty list"):
        draw(tiny_llama, char_tok, prompts=[])
    with pytest.raises(ValueError, match="non-empty list"):
        draw(tiny_llama, char_tok, prompts="hello")
    with pytest.raises(ValueError, match="num_samples"):
        draw(tiny_llama, char_tok, num_samples=0)
    with pytest.raises(TypeError, match="LogitTransform"):
        draw(tiny_llama, char_tok, transform={"temperature": 1.0})
    with pytest.raises(ValueError, match="prompt 0"):
        draw(tiny_llama, char_tok, prompts=[3])
    tok = char_tok.__class__(tokenizer_object=char_tok.backend_tokenizer, eos_token="</s>", pad_token="</s>")
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        draw(tiny_llama, tok, prompts=[PROMPTS[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bare str stop string is one string, not its characters
        s = draw(tiny_llama, char_tok, stop_strings="ab", max_new_tokens=2)
    assert s.stop_strings == ("ab",)


@pytest.mark.slow
def test_real_model_chat_sampling_matches_generate_scores(smollm2, monkeypatch):
    """SmolLM2: chat template, pad = EOS = <|im_end|>, a stop string; engine = generate's scores."""
    model, tok = smollm2
    calls = capture_generate(model, monkeypatch)
    transform = LogitTransform(temperature=0.7, top_p=0.95)
    s = sample(
        model,
        tok,
        [[{"role": "user", "content": "What is 2+3?"}], "The capital of France is"],
        num_samples=2,
        transform=transform,
        max_new_tokens=8,
        stop_strings=("\n",),
        progress=False,
    )
    assert s.rollouts.eos_token_ids == (tok.eos_token_id,)
    assert s.prompt_texts[0].endswith("<|im_start|>assistant\n")
    scores = torch.stack(calls[0]["scores"], 1).log_softmax(-1)  # [N, n_steps, V]
    ref = scores.gather(-1, s.rollouts.completion_ids[:, : scores.shape[1], None]).squeeze(-1)
    ours = LogProbEngine(EngineConfig.from_transform(transform, progress=False)).score(model, s.rollouts)
    m = ours.mask[:, : scores.shape[1]]
    torch.testing.assert_close(ours.token_logp[:, : scores.shape[1]][m], ref[m], atol=TOL, rtol=TOL)
