"""LogProbEngine against naive references: one-by-one unpadded rows, full logits, HF generate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import isdelta.engine.chunks as chunks_mod
import isdelta.engine.fused as fused_mod
import isdelta.engine.logprob as logprob_mod
from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, Rollouts, completion_mask
from tests.conftest import one_layer_llama

TOL = 1e-5  # fp32
TRANSFORMS = [
    LogitTransform(),
    LogitTransform(temperature=0.7),
    LogitTransform(top_k=7),
    LogitTransform(top_p=0.8),
    LogitTransform(temperature=1.3, top_k=20, top_p=0.9),
]


def random_rollouts(rng, P=3, G=3, V=96, eos=(2,), max_prompt=6, max_comp=7, stop_frac=0.6):
    """Ragged prompts (1..max_prompt tokens) and completions, some stopping early, pad == eos."""
    prompts = [rng.integers(3, V, size=rng.integers(1, max_prompt + 1)).tolist() for _ in range(P)]
    comps = []
    for _ in range(P * G):
        c = rng.integers(3, V, size=rng.integers(1, max_comp + 1)).tolist()
        if rng.random() < stop_frac:
            c[rng.integers(0, len(c))] = int(rng.choice(eos))
        comps.append(c)
    return prompts, comps, Rollouts.from_token_lists(prompts, comps, eos_token_ids=eos, pad_token_id=2)


def sampled_rollouts(model, transform, P=3, G=3, max_new_tokens=7, seed=0):
    """Completions drawn from `model` under `transform` (so every token is inside its kept set)."""
    torch.manual_seed(seed)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]][:P]
    comps = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=max_new_tokens,
                num_return_sequences=G,
                pad_token_id=2,
                eos_token_id=2,
                **transform.generate_kwargs(),
            )
        for row in out[:, len(p) :].tolist():
            comps.append(row[: row.index(2) + 1] if 2 in row else row)
    return prompts, comps, Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def naive_scores(model, prompt, comp, transform=LogitTransform(), eos=(2,), include_eos=True):
    """Per-row reference: unpadded forward, full logits, log_softmax, gather, entropy."""
    mask = completion_mask(torch.tensor([comp]), eos, include_eos=include_eos)[0]
    ids = torch.tensor([list(prompt) + list(comp)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [C, V]
    logp = torch.log_softmax(transform(logits), -1)
    p = logp.exp()
    ent = -torch.nan_to_num(p * logp).sum(-1)
    var = torch.nan_to_num(p * (logp + ent[:, None]) ** 2).sum(-1)
    tok = logp[torch.arange(len(comp)), torch.tensor(comp)]
    return tok[mask], ent[mask], var[mask]


def assert_matches_naive(model, prompts, comps, ro, scores, transform=LogitTransform(), include_eos=True, eos=(2,)):
    G = len(comps) // len(prompts)
    for r, comp in enumerate(comps):
        tok, ent, var = naive_scores(model, prompts[r // G], comp, transform, eos, include_eos=include_eos)
        L = int(scores.length[r])
        assert L == len(tok)
        m = scores.mask[r]
        torch.testing.assert_close(scores.token_logp[r][m], tok, atol=TOL, rtol=TOL)
        torch.testing.assert_close(scores.token_entropy[r][m], ent, atol=TOL, rtol=TOL)
        torch.testing.assert_close(scores.token_varentropy[r][m], var, atol=10 * TOL, rtol=TOL)
        torch.testing.assert_close(scores.logp[r], tok.double().sum(), atol=10 * TOL, rtol=0)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_batched_left_padded_equals_one_by_one(arch, request, rng):
    model = request.getfixturevalue(arch)
    prompts, comps, ro = random_rollouts(rng)
    scores = LogProbEngine(progress=False).score(model, ro)
    assert_matches_naive(model, prompts, comps, ro, scores)


def test_gpt2_needs_explicit_position_ids(tiny_gpt2, rng, monkeypatch):
    """The same comparison fails for an absolute-position model when positions are left implicit."""
    prompts, comps, ro = random_rollouts(rng, max_prompt=8)
    monkeypatch.setattr(logprob_mod, "_position_ids", lambda att: None)
    scores = LogProbEngine(progress=False, check_head=False).score(tiny_gpt2, ro)
    with pytest.raises(AssertionError):
        assert_matches_naive(tiny_gpt2, prompts, comps, ro, scores)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("include_eos", [True, False])
def test_engine_equals_full_logits_reference(tiny_llama, rng, transform, include_eos):
    # random tokens fall outside a top-k/top-p set (log p = -inf), so sample those from the model
    prompts, comps, ro = sampled_rollouts(tiny_llama, transform) if transform.truncates else random_rollouts(rng)
    cfg = EngineConfig.from_transform(transform, include_eos=include_eos, progress=False)
    scores = LogProbEngine(cfg).score(tiny_llama, ro)
    assert_matches_naive(tiny_llama, prompts, comps, ro, scores, transform, include_eos)


def test_transform_equals_hf_warpers(rng):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor(rng.normal(size=(16, 300)) * 3, dtype=torch.float32)
    t = LogitTransform(temperature=0.8, top_k=40, top_p=0.7)
    ref = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(40)(None, TemperatureLogitsWarper(0.8)(None, logits)))
    torch.testing.assert_close(t(logits), ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "transform", [LogitTransform(temperature=0.9, top_k=12, top_p=0.85), LogitTransform(temperature=1.2)], ids=str
)
def test_scores_equal_hf_generate_processed_scores(tiny_llama, transform):
    """The log-probs of sampled tokens equal log_softmax of the scores HF generate sampled from."""
    torch.manual_seed(3)
    prompt_ids = torch.tensor([[2, 2, 5, 6, 7], [8, 9, 10, 11, 12], [2, 2, 2, 13, 14]])
    prompt_mask = (torch.arange(5)[None] >= torch.tensor([[2], [0], [3]])).long()
    with torch.no_grad():
        out = tiny_llama.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=8,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=2,
            eos_token_id=2,
            **transform.generate_kwargs(),
        )
    comp = out.sequences[:, 5:]
    ro = Rollouts.from_tensors(
        prompt_ids, prompt_mask, comp, completion_mask(comp, 2), eos_token_ids=2, num_generations=1
    )
    scores = LogProbEngine(EngineConfig.from_transform(transform, progress=False)).score(tiny_llama, ro)
    hf = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [N, C, V]
    hf_tok = hf.gather(-1, comp[..., None]).squeeze(-1)
    m = scores.mask
    torch.testing.assert_close(scores.token_logp[m], hf_tok[m], atol=TOL, rtol=TOL)


def test_token_budget_does_not_change_scores(tiny_llama, rng):
    """Batch invariance in fp32: one row per micro-batch vs everything at once."""
    _, _, ro = random_rollouts(rng, P=4, G=4)
    results = [LogProbEngine(token_budget=b, progress=False).score(tiny_llama, ro) for b in (1, 17, 10**6)]
    assert len(LogProbEngine(token_budget=1).micro_batches(ro, ro.completion_mask)) == ro.n_rows
    for s in results[1:]:
        torch.testing.assert_close(s.logp, results[0].logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.entropy_sum, results[0].entropy_sum, atol=1e-5, rtol=0)
    # the same configuration twice is bit-identical: ΔH = 0 exactly when p1 = p0
    again = LogProbEngine(token_budget=17, progress=False).score(tiny_llama, ro)
    assert torch.equal(again.logp, results[1].logp)


def test_small_head_chunks_equal_one_chunk(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    a = LogProbEngine(chunk_elems=96 * 3, progress=False).score(tiny_llama, ro)
    b = LogProbEngine(progress=False).score(tiny_llama, ro)
    torch.testing.assert_close(a.token_logp, b.token_logp, atol=1e-6, rtol=0)


def test_row_fields_and_empty_rows(tiny_llama):
    ro = Rollouts.from_token_lists([[5, 6]], [[2], [7, 8, 2], [9, 10]], eos_token_ids=2)
    s = LogProbEngine(include_eos=False, progress=False).score(tiny_llama, ro)
    assert s.length.tolist() == [0, 2, 2] and s.empty.tolist() == [True, False, False]
    assert s.logp[0].item() == 0.0 and np.isnan(s.mean_logp[0].item())
    assert s.mean_logp[1].item() == pytest.approx(s.logp[1].item() / 2)
    full = LogProbEngine(progress=False).score(tiny_llama, ro)
    # excluding EOS = subtracting the stop position (what the estimators' include="no_eos" does)
    torch.testing.assert_close(full.logp - full.stop_logp, s.logp, atol=1e-6, rtol=0)
    assert full.stopped.tolist() == [True, True, False]
    arrays = full.to_numpy()
    assert arrays["logp"].dtype == np.float64 and arrays["token_logp"].shape == (3, 3)


@pytest.mark.parametrize("fused", ["off", "on"])  # "on": the graph keeps the eager path
def test_requires_grad_gives_the_gradient_of_the_reference(tiny_llama, rng, fused):
    prompts, comps, ro = random_rollouts(rng, P=2, G=2)
    s = LogProbEngine(requires_grad=True, progress=False, fused=fused).score(tiny_llama, ro)
    tiny_llama.zero_grad()
    s.logp.sum().backward()
    g_engine = tiny_llama.model.layers[0].mlp.up_proj.weight.grad.clone()
    tiny_llama.zero_grad()
    total = 0.0
    for r, comp in enumerate(comps):
        p = prompts[r // 2]
        ids = torch.tensor([p + comp])
        logp = torch.log_softmax(tiny_llama(ids).logits[0, len(p) - 1 : -1].float(), -1)
        m = completion_mask(torch.tensor([comp]), 2)[0]
        total = total + logp[torch.arange(len(comp)), torch.tensor(comp)][m].sum()
    total.backward()
    g_ref = tiny_llama.model.layers[0].mlp.up_proj.weight.grad.clone()
    tiny_llama.zero_grad()
    torch.testing.assert_close(g_engine, g_ref, atol=1e-4, rtol=1e-4)


def test_train_mode_is_restored_and_dropout_off(tiny_gpt2, rng):
    _, _, ro = random_rollouts(rng)
    tiny_gpt2.train()
    try:
        a = LogProbEngine(progress=False).score(tiny_gpt2, ro)
        b = LogProbEngine(progress=False).score(tiny_gpt2, ro)
        assert tiny_gpt2.training
    finally:
        tiny_gpt2.eval()
    assert torch.equal(a.logp, b.logp)


def test_non_finite_logits_name_the_rows(tiny_llama, rng):
    import copy

    broken = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    _, _, ro = random_rollouts(rng)
    with pytest.raises(FloatingPointError, match="non-finite logits for rows"):
        LogProbEngine(progress=False, check_head=False).score(broken, ro)
    with pytest.raises(FloatingPointError, match="non-finite logits for row"):  # not "unknown head"
        LogProbEngine(progress=False).score(broken, ro)


def test_a_model_without_separate_head_is_refused(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    with pytest.raises(TypeError, match="ForCausalLM"):
        LogProbEngine(progress=False).score(tiny_llama.model, ro)


def test_unknown_logit_transformation_fails_the_head_check(tiny_llama, rng):
    import copy

    odd = copy.deepcopy(tiny_llama)
    original = type(odd).forward

    def forward(self, *a, **kw):  # an architecture that scales logits in its forward
        out = original(self, *a, **kw)
        out.logits = out.logits * 0.5
        return out

    odd.forward = forward.__get__(odd)
    _, _, ro = random_rollouts(rng)
    with pytest.raises(TypeError, match="does not know"):
        LogProbEngine(progress=False).score(odd, ro)


def test_tokens_outside_top_k_warn(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    with pytest.warns(UserWarning, match="outside this transform"):
        s = LogProbEngine(top_k=1, progress=False).score(tiny_llama, ro)
    assert torch.isneginf(s.logp).any()


def test_stop_entropy_sum_is_the_stop_ids_share_of_the_entropy(tiny_llama, rng):
    """Σ_t −p(e) log p(e) over stop ids, against the full-logits reference (two stop ids)."""
    prompts, comps, _ = random_rollouts(rng, eos=(2, 9))
    ro = Rollouts.from_token_lists(prompts, comps, eos_token_ids=(2, 9), pad_token_id=2)
    s = LogProbEngine(progress=False).score(tiny_llama, ro)
    G = len(comps) // len(prompts)
    for r, comp in enumerate(comps):
        p = prompts[r // G]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(torch.tensor([p + comp])).logits[0, len(p) - 1 : -1].float(), -1)
        m = completion_mask(torch.tensor([comp]), (2, 9))[0]
        want = -(logp.exp()[:, [2, 9]] * logp[:, [2, 9]]).sum(-1)[m].double().sum()
        torch.testing.assert_close(s.stop_entropy_sum[r], want, atol=1e-6, rtol=1e-6)


def test_bf16_model_scores_in_fp32_close_to_the_fp32_model(tiny_llama, rng):
    """dtype policy: a bf16 body + head, logits upcast to fp32 before log_softmax."""
    import copy

    _, _, ro = random_rollouts(rng)
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    s16 = LogProbEngine(progress=False).score(half, ro)
    s32 = LogProbEngine(progress=False).score(tiny_llama, ro)
    assert s16.token_logp.dtype == torch.float32 and s16.logp.dtype == torch.float64
    m = s32.mask
    # bf16 has ~3 significant digits: per-token log-probs of O(10) nats agree to a few 0.1 nats
    assert (s16.token_logp[m] - s32.token_logp[m]).abs().max() < 0.5
    # and the same config twice is still bit-identical (ΔH = 0 exactly for p1 = p0)
    assert torch.equal(LogProbEngine(progress=False).score(half, ro).logp, s16.logp)


def _tiny_adamw_step(model, ro, lr):
    """p1: one AdamW step of lr on the mean log-likelihood of ``ro`` (every weight moves ≈ lr)."""
    import copy

    p1 = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(p1.parameters(), lr=lr, weight_decay=0.0)
    s = LogProbEngine(progress=False, requires_grad=True, check_head=False).score(p1, ro)
    (-s.logp.mean()).backward()
    opt.step()
    return p1.eval()


def test_bf16_autocast_blows_up_a_tiny_step_and_fp32_scoring_sees_it_as_it_is(tiny_llama, rng):
    """An AdamW step of 1e-6 scored under a bf16 autocast: rounding the weights to bf16 turns it
    into a far larger random change; EngineConfig(fp32=True) turns autocast off and scores the
    fp32 weights, bit for bit as with no autocast at all (benchmarks/README.md, bf16)."""
    _, _, ro = random_rollouts(rng, P=4, G=4)
    p1 = _tiny_adamw_step(tiny_llama, ro, 1e-6)
    plain, fp32 = LogProbEngine(progress=False), LogProbEngine(progress=False, fp32=True)
    m = plain.score(tiny_llama, ro).mask

    def moved(engine) -> float:
        return float((engine.score(p1, ro).token_logp - engine.score(tiny_llama, ro).token_logp)[m].abs().mean())

    true_move = moved(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded, kept = moved(plain), moved(fp32)
    assert kept == true_move  # autocast off: the same fp32 arithmetic
    assert rounded > 3 * true_move  # bf16 weights: mostly rounding noise (5× here, 20× on SmolLM2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = fp32.score(p1, ro).logp
    assert torch.equal(same, plain.score(p1, ro).logp)


def test_fp32_scoring_refuses_bf16_weights_and_p1_equal_p0_is_exactly_zero_in_bf16(tiny_llama, rng):
    import copy

    from isdelta.estimators import estimate

    _, _, ro = random_rollouts(rng)
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"fp32=True.*bfloat16.*master weights"):
        LogProbEngine(progress=False, fp32=True).score(half, ro)
    a, b = (LogProbEngine(progress=False).score(half, ro) for _ in range(2))
    group = ro.group.numpy()
    est = estimate(a.logp.numpy(), b.logp.numpy(), a.length.numpy(), group)
    assert est.delta.value == 0.0 and est.delta.se == 0.0


@pytest.mark.parametrize("fused", ["off", "on"])
def test_entropy_is_accurate_at_a_real_vocabulary_size(rng, fused):
    """V = 49152 (SmolLM2's) with near-uniform rows, the worst case for a long fp32 sum: entropy
    and varentropy within fp32's own limit of the float64 reference (a flat fp32 dot along V was
    off by ~9e-5 nats here), on the eager and on the compiled path."""
    torch.manual_seed(0)
    V = 49152
    model = one_layer_llama(V)
    ro = random_rollouts(rng, P=2, G=2, V=V, max_comp=6)[2]
    s = LogProbEngine(EngineConfig(progress=False, fused=fused)).score(model, ro)
    att = ro.attention_mask
    with torch.no_grad():
        logits = model(
            input_ids=ro.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)
        ).logits.double()
    logp = torch.log_softmax(logits[:, ro.prompt_len - 1 : -1], -1)  # [N, C, V] float64
    H = -(logp.exp() * logp).sum(-1)
    varH = (logp.exp() * (logp + H[..., None]) ** 2).sum(-1)
    m = s.mask
    assert H[m].min() > 10.0  # near-uniform: log V = 10.8
    assert (s.token_entropy[m].double() - H[m]).abs().max() < 3e-5
    assert (s.token_varentropy[m].double() - varH[m]).abs().max() < 1e-4 * varH[m].max() + 1e-5


def test_row_dot_equals_the_plain_sum_for_any_width():
    for V in (7, 1024, 1500, 4096, 5000):
        a, b = torch.rand(3, V, dtype=torch.float64), torch.rand(3, V, dtype=torch.float64)
        assert torch.allclose(chunks_mod.row_dot(a, b), (a * b).sum(-1), rtol=1e-12)


# ---------------------------------------------------------------------- the compiled path (fused.py)
FUSED_TRANSFORMS = [LogitTransform(), LogitTransform(temperature=0.7), LogitTransform(temperature=1.6)]


@pytest.mark.parametrize("transform", FUSED_TRANSFORMS, ids=str)
@pytest.mark.parametrize("include_eos", [True, False])
def test_fused_engine_equals_the_naive_reference_and_the_eager_engine(
    tiny_llama, rng, transform, include_eos, fused_calls
):
    prompts, comps, ro = random_rollouts(rng, eos=(2, 9))
    cfg = EngineConfig.from_transform(transform, include_eos=include_eos, progress=False)
    on = LogProbEngine(replace(cfg, fused="on")).score(tiny_llama, ro)
    assert fused_calls, "the compiled path did not run"
    assert_matches_naive(tiny_llama, prompts, comps, ro, on, transform, include_eos, eos=(2, 9))
    off = LogProbEngine(replace(cfg, fused="off")).score(tiny_llama, ro)
    for name in ("token_logp", "token_entropy", "token_varentropy"):
        torch.testing.assert_close(getattr(on, name), getattr(off, name), atol=TOL, rtol=TOL)
    torch.testing.assert_close(on.stop_entropy_sum, off.stop_entropy_sum, atol=1e-6, rtol=1e-6)
    # the same configuration twice is bit-identical on this path too: ΔH = 0 exactly when p1 = p0
    assert torch.equal(LogProbEngine(replace(cfg, fused="on")).score(tiny_llama, ro).logp, on.logp)


def test_fused_one_row_chunks_and_micro_batches_equal_one_chunk(tiny_llama, rng):
    _, _, ro = random_rollouts(rng, eos=(2, 9))
    one = LogProbEngine(progress=False, fused="on").score(tiny_llama, ro)
    rows = LogProbEngine(progress=False, fused="on", chunk_elems=96, token_budget=17).score(tiny_llama, ro)
    # the body's batch composition moves hidden states by ~1e-7; the statistics add nothing
    torch.testing.assert_close(rows.token_logp, one.token_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.token_varentropy, one.token_varentropy, atol=1e-5, rtol=0)


def test_fused_auto_compiles_only_past_the_break_even(tiny_llama, rng, fused_calls, monkeypatch):
    _, _, ro = random_rollouts(rng, eos=(2, 9))
    LogProbEngine(progress=False).score(tiny_llama, ro)  # auto, ~100 tokens × 96 logits
    assert fused_calls == []
    n_logits = int(ro.mask(True).sum()) * 96
    monkeypatch.setitem(fused_mod.FUSE_MIN_LOGITS, "cpu", n_logits)
    LogProbEngine(progress=False).score(tiny_llama, ro)
    assert fused_calls
    engine = LogProbEngine(progress=False)
    assert engine.fuses(n_logits, torch.device("cpu")) and not engine.fuses(n_logits - 1, torch.device("cpu"))


@pytest.mark.parametrize(
    "kw",
    [dict(fused="off"), dict(fused="on", top_k=7), dict(fused="on", top_p=0.8), dict(fused="on", requires_grad=True)],
)
def test_truncation_and_gradients_keep_the_eager_path(tiny_llama, rng, fused_calls, kw):
    prompts, comps, ro = sampled_rollouts(tiny_llama, EngineConfig(**kw).transform)
    s = LogProbEngine(progress=False, **kw).score(tiny_llama, ro)
    assert fused_calls == []
    assert_matches_naive(tiny_llama, prompts, comps, ro, s, EngineConfig(**kw).transform)


def test_a_failed_compile_falls_back_to_eager_silently_once(tiny_llama, rng, monkeypatch, caplog):
    """No C++ compiler, no Triton, an unsupported platform: torch.compile raises on its first call."""
    import logging
    import warnings

    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(fused_mod, "_compiled", lambda: broken)
    monkeypatch.setattr(fused_mod, "_failed", set())
    _, _, ro = random_rollouts(rng, eos=(2, 9))
    with caplog.at_level(logging.DEBUG, logger="isdelta.engine.fused"), warnings.catch_warnings():
        warnings.simplefilter("error")
        a = LogProbEngine(progress=False, fused="on").score(tiny_llama, ro)
        b = LogProbEngine(progress=False, fused="on").score(tiny_llama, ro)
    assert len(attempts) == 1 and not LogProbEngine(progress=False).fuses(2**62, torch.device("cpu"))
    notes = [r for r in caplog.records if r.name == "isdelta.engine.fused"]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG and "eager" in notes[0].getMessage()
    eager = LogProbEngine(progress=False, fused="off").score(tiny_llama, ro)
    assert torch.equal(a.logp, eager.logp) and torch.equal(b.token_varentropy, eager.token_varentropy)


def test_non_finite_logits_name_the_rows_on_the_fused_path(tiny_llama, rng):
    import copy

    broken = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    _, _, ro = random_rollouts(rng, eos=(2, 9))
    with pytest.raises(FloatingPointError, match="non-finite logits for rows"):
        LogProbEngine(progress=False, check_head=False, fused="on").score(broken, ro)


def test_fused_bf16_model_equals_the_eager_bf16_scores(tiny_llama, rng):
    """bf16 body and head, fp32 statistics: the compiled path reads the bf16 logits and upcasts them
    as it goes; the eager path copies them to fp32 first. Same numbers."""
    import copy

    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    _, _, ro = random_rollouts(rng, eos=(2, 9))
    on = LogProbEngine(progress=False, fused="on").score(half, ro)
    off = LogProbEngine(progress=False, fused="off").score(half, ro)
    assert on.token_logp.dtype == torch.float32
    torch.testing.assert_close(on.token_logp, off.token_logp, atol=TOL, rtol=TOL)
    torch.testing.assert_close(on.token_entropy, off.token_entropy, atol=TOL, rtol=TOL)


def test_fused_option_is_validated():
    with pytest.raises(ValueError, match="fused must be 'auto', 'on' or 'off'"):
        EngineConfig(fused="yes")
