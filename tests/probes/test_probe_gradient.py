"""gradient_delta against an exact enumeration (finite differences of H and of the entropy rate),
against a naive per-row reference (float64 directional derivatives of every row), against itself
micro-batched differently; parameter_delta's architecture checks; the model state afterwards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import PROMPTS

from isdelta.engine import EngineConfig, LogProbEngine
from isdelta.probes import gradient_delta, parameter_delta, restore_parameters, snapshot_parameters, step_sweep

ENGINE = EngineConfig(progress=False)


def naive_reference(enumerable, ro, index, direction, include: str) -> dict:
    """ΔH₁ and ΔH₁_tok from per-row directional derivatives D_i = ⟨∇S_i, d⟩ (forward-mode AD of
    a float64 full-logits scorer), one prompt at a time: A_p = −Cov_p(S', D) + stop term."""
    group = ro.group.numpy()
    A, B, S_all, L_all, sizes, rowmean = [], [], [], [], [], 0.0
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        prompt = tuple(int(t) for t in ro.input_ids[rows[0], : ro.prompt_len] if t != 0)
        s0 = enumerable.scores(prompt, direction)
        j = index[rows]
        D, D_stop = s0["D"][j], s0["D_stop"][j]  # [G]
        S, L, stop = s0["logp"][j], enumerable.length[j], enumerable.stopped[j]
        if include == "no_eos":
            S, L = S - s0["stop_logp"][j], L - stop
        G = len(rows)
        a = -np.sum((S - S.mean()) * D) / (G - 1) + (np.mean(stop * D_stop) if include == "no_eos" else 0.0)
        A.append(a)
        B.append(-np.sum((L - L.mean()) * D) / (G - 1))
        S_all.append(S.mean())
        L_all.append(L.mean())
        # DESIGN §6 read literally: −(1/N) Σ_i (S_i − b_i) D_i, one mean over all rows
        b = (S.sum() - S) / (G - 1)
        rowmean += -np.sum((S - b) * D)
        sizes.append(G)
    A, B = np.array(A), np.array(B)
    lam = np.mean(L_all)
    h = -np.mean(S_all) / lam
    return {
        "seq": A.mean(),
        "tok": np.mean(A + h * B) / lam,
        "A": A,
        "tok_p": (A + h * B) / lam,
        "row_mean": rowmean / np.sum(sizes),
    }


@pytest.mark.parametrize("include", ["all", "no_eos"])
def test_gradient_matches_naive_per_row_reference_with_ragged_groups(enumerable, rng, include):
    """Equal prompt mass with ragged G: per-prompt A_p, ΔH₁ and ΔH₁_tok equal the float64
    reference (1e-4); the per-row mean of DESIGN's ℓ_H (1/N) is visibly different here."""
    groups = [PROMPTS[0], PROMPTS[1]] * 3
    sizes = [3, 12, 6, 2, 9, 4]
    ro, index = enumerable.sample(rng, groups, sizes)
    d = enumerable.direction(seed=3, scale=0.05)
    cfg = EngineConfig(progress=False, include_eos=include == "all")
    got = gradient_delta(enumerable.model, ro, d, per_token=True, engine_config=cfg)
    ref = naive_reference(enumerable, ro, index, d, include)
    np.testing.assert_allclose(got.per_prompt, ref["A"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.per_prompt_tok, ref["tok_p"], rtol=1e-4, atol=1e-6)
    assert got.delta1.value == pytest.approx(ref["seq"], rel=1e-4, abs=1e-6)
    assert got.delta1_tok.value == pytest.approx(ref["tok"], rel=1e-4, abs=1e-6)
    assert got.value == got.delta1_tok.value and got.include == include
    assert got.n_backward == 2 * len(sizes)  # one micro-batch per prompt, two backwards each
    if include == "all":
        assert abs(ref["row_mean"] - ref["seq"]) > 0.05 * abs(ref["seq"])


def test_gradient_is_unbiased_for_the_exact_derivative(enumerable, rng):
    """⟨∇H, d⟩ and ⟨∇(H/E[L]), d⟩ from 2048 samples match central finite differences of the
    exactly enumerated H and entropy rate (which match the closed-form derivative) within 4 SE;
    the function-space ΔH₁(α)/α on the same samples agrees with the gradient as α → 0, and the
    SNIS ΔH(α)/α covers the exact slope."""
    groups = [PROMPTS[0]] * 128  # one prompt repeated: the between-group SE is the sampling SE
    ro, _ = enumerable.sample(rng, groups, [16] * 128)
    d = enumerable.direction(seed=0, scale=0.05)
    exact_seq, exact_tok = enumerable.finite_difference(groups[:1], d)
    assert (exact_seq, exact_tok) == pytest.approx(enumerable.derivative(groups[:1], d), rel=1e-4)
    got = gradient_delta(enumerable.model, ro, d, per_token=True, engine_config=ENGINE)
    for est, exact in ((got.delta1, exact_seq), (got.delta1_tok, exact_tok)):
        assert est.se < 0.25 * abs(exact)  # the test has power
        assert abs(est.value - exact) < 4 * est.se, (est, exact)
    alpha = 1e-3
    sweep = step_sweep(
        enumerable.model, d, ro, [alpha], engine_config=ENGINE, gradient=got, estimator_kw={"weights": "none"}
    )
    point = sweep.estimates[0]
    assert point.delta1.value / alpha == pytest.approx(got.delta1.value, rel=1e-2)
    assert sweep.delta1_tok_fs[0] / alpha == pytest.approx(got.delta1_tok.value, rel=2e-2)
    assert abs(point.delta.value / alpha - exact_seq) < 4 * point.delta.se / alpha


def test_per_token_matches_the_exact_entropy_rate_derivative_without_eos(enumerable, rng):
    """include_eos=False: the rate's gradient (with the stop token's own log-prob term) matches
    the finite difference of the exact no-EOS rate, and the sequence value that of H'."""
    groups = [PROMPTS[1]] * 128
    ro, _ = enumerable.sample(rng, groups, [16] * 128)
    d = enumerable.direction(seed=0, scale=0.05)
    exact_seq, exact_tok = enumerable.finite_difference(groups[:1], d, include="no_eos")
    assert (exact_seq, exact_tok) == pytest.approx(enumerable.derivative(groups[:1], d, "no_eos"), rel=1e-4)
    cfg = EngineConfig(progress=False, include_eos=False)
    got = gradient_delta(enumerable.model, ro, d, per_token=True, engine_config=cfg)
    for est, exact in ((got.delta1, exact_seq), (got.delta1_tok, exact_tok)):
        assert abs(est.value - exact) < 4 * est.se + 0.02 * abs(exact), (est, exact)


def test_micro_batching_does_not_change_the_probe(enumerable, rng):
    """token_budget = 1 (one row per backward) gives the value of one backward per prompt."""
    ro, _ = enumerable.sample(rng, [PROMPTS[0], PROMPTS[1]], [5, 7])
    d = enumerable.direction(seed=1, scale=0.05)
    big = gradient_delta(enumerable.model, ro, d, per_token=True, engine_config=ENGINE)
    small = gradient_delta(
        enumerable.model, ro, d, per_token=True, engine_config=EngineConfig(progress=False, token_budget=1)
    )
    assert small.n_backward == 2 * ro.n_rows and big.n_backward == 4
    np.testing.assert_allclose(small.per_prompt, big.per_prompt, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(small.per_prompt_tok, big.per_prompt_tok, rtol=1e-5, atol=1e-7)


def test_given_scores0_equal_recomputed_and_model_state_is_untouched(enumerable, rng):
    """scores0 from the caller gives the same value; parameters, .grad, requires_grad flags and
    the train/eval mode are as before (a frozen parameter of d still gets its gradient)."""
    model = copy.deepcopy(enumerable.model).train()
    ro, _ = enumerable.sample(rng, [PROMPTS[0]] * 2, [6, 6])
    d = enumerable.direction(seed=2, scale=0.05)
    model.lm_head.weight.requires_grad_(False)
    marker = torch.full_like(model.model.norm.weight, 7.0)
    model.model.norm.weight.grad = marker.clone()
    before = snapshot_parameters(model)
    scores0 = LogProbEngine(ENGINE).score(model, ro)
    a = gradient_delta(model, ro, d, engine_config=ENGINE)
    b = gradient_delta(model, ro, d, engine_config=ENGINE, scores0=scores0.to_numpy())
    only_head = gradient_delta(model, ro, {"lm_head.weight": d["lm_head.weight"]}, engine_config=ENGINE)
    assert b.delta1.value == pytest.approx(a.delta1.value, rel=1e-6)
    assert only_head.delta1.value != 0.0  # the frozen head was differentiated
    assert model.training and not model.lm_head.weight.requires_grad
    assert torch.equal(model.model.norm.weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_inputs_raise_with_a_fix(enumerable, rng):
    """One row in a prompt, scores0 scored without EOS, a direction of another model."""
    ro, _ = enumerable.sample(rng, [PROMPTS[0], PROMPTS[1]], [4, 1])
    d = enumerable.direction(seed=0, scale=0.05)
    with pytest.raises(ValueError, match="G_p ≥ 2"):
        gradient_delta(enumerable.model, ro, d, engine_config=ENGINE)
    ro, _ = enumerable.sample(rng, [PROMPTS[0]], [8])
    no_eos = LogProbEngine(EngineConfig(progress=False, include_eos=False)).score(enumerable.model, ro)
    if not torch.equal(no_eos.length, ro.lengths):  # some sample stopped
        with pytest.raises(ValueError, match="include_eos=True"):
            gradient_delta(enumerable.model, ro, d, engine_config=ENGINE, scores0=no_eos)
    with pytest.raises(ValueError, match="lacks"):
        gradient_delta(enumerable.model, ro, {"model.extra.weight": torch.zeros(3)}, engine_config=ENGINE)
    with pytest.raises(TypeError, match="mapping"):
        gradient_delta(enumerable.model, ro, torch.zeros(3), engine_config=ENGINE)


# ---------------------------------------------------------------------------- parameter_delta
def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = {
        "vocab_size": 6,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw}))


def test_parameter_delta_is_theta1_minus_theta0_from_models_or_snapshots(enumerable):
    """d = θ1 − θ0 per parameter, equal from a model and from its CPU snapshot; restore works."""
    model0 = enumerable.model
    model1 = copy.deepcopy(model0)
    snap = snapshot_parameters(model1)
    with torch.no_grad():
        for p in model1.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = parameter_delta(model0, model1)
    d_snap = parameter_delta(snapshot_parameters(model0), model1, device="cpu")
    for n, p1 in model1.named_parameters():
        p0 = dict(model0.named_parameters())[n]
        assert torch.equal(d[n], p1.detach() - p0.detach()) and torch.equal(d_snap[n], d[n])
    restore_parameters(model1, snap)
    assert all(torch.equal(a, b) for a, b in zip(model0.parameters(), model1.parameters()))


@pytest.mark.parametrize(
    "change,match",
    [({"hidden_size": 32, "intermediate_size": 32}, "shape"), ({"num_hidden_layers": 2}, "not in model0")],
)
def test_parameter_delta_refuses_different_architectures(change, match):
    """A different width (shapes) or depth (names) is named in the error."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match) as err:
        parameter_delta(_llama(), _llama(**change))
    assert "same architecture" in str(err.value) or "not the same architecture" in str(err.value)


def test_gradient_checkpointing_in_train_mode_gives_the_same_probe(rng):
    """TRL turns gradient checkpointing on and trains in train mode; the engine scores in eval mode,
    so the backward has to run in it too (else the checkpoint recomputes another graph and fails)."""
    import warnings

    from tests.training.test_monitor import sampled_rollouts

    model = _llama(vocab_size=96, num_hidden_layers=2, max_position_embeddings=64)
    ro = sampled_rollouts(model.eval(), rng, P=2, G=3)
    d = {
        n: 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in model.named_parameters()
    }
    plain = gradient_delta(model, ro, d, per_token=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' rename of the method
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.model.layers[0].eval()  # a mixed mode, restored module by module
    ckpt = gradient_delta(model, ro, d, per_token=True)
    assert ckpt.delta1.value == pytest.approx(plain.delta1.value, rel=1e-5, abs=1e-9)
    assert ckpt.delta1_tok.value == pytest.approx(plain.delta1_tok.value, rel=1e-5, abs=1e-11)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
