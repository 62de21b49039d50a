"""update() against a naive full-logits loss, and against itself split into micro-batches; rewards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, Rollouts, completion_mask
from isdelta.training import REWARDS, UpdateResult, ZeroUpdateError, advantages, update
from isdelta.training.rewards import answer_match, boxed_match

NO_BAR = {"progress": False}


def random_rollouts(rng, P=3, G=4, V=96, max_prompt=5, max_comp=6):
    """Ragged prompts and completions, some stopping at EOS = pad = 2 before their end."""
    prompts = [rng.integers(3, V, size=rng.integers(1, max_prompt + 1)).tolist() for _ in range(P)]
    comps = []
    for _ in range(P * G):
        c = rng.integers(3, V, size=rng.integers(1, max_comp + 1)).tolist()
        if rng.random() < 0.5:
            c[rng.integers(0, len(c))] = 2
        comps.append(c)
    return prompts, comps, Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def naive_loss(model, prompts, comps, weights, transform=LogitTransform()):
    """−Σ_i w_i Σ_t log p(x_it) / Σ_i L_i, one unpadded row at a time with full logits."""
    G = len(comps) // len(prompts)
    total, n_tokens = 0.0, 0
    for r, comp in enumerate(comps):
        m = completion_mask(torch.tensor([comp]), 2)[0]
        ids = torch.tensor([prompts[r // G] + comp])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[r // G]) - 1 : -1].float()  # [C, V]
        logp = torch.log_softmax(transform(logits), -1)[torch.arange(len(comp)), torch.tensor(comp)]
        total += float(weights[r]) * float(logp[m].double().sum())
        n_tokens += int(m.sum())
    return -total / n_tokens


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------- the update
@pytest.mark.parametrize("loss", ["sft", "reinforce"])
def test_loss_equals_naive_and_is_invariant_to_micro_batching(tiny_llama, rng, loss):
    """One row per micro-batch and all rows in one give the same loss, gradient and step (1e-6)."""
    prompts, comps, ro = random_rollouts(rng)
    rewards = rng.integers(0, 2, size=ro.n_rows).astype(float) if loss == "reinforce" else None
    if loss == "reinforce":
        rewards[:2] = [0.0, 1.0]  # at least one prompt with signal
    theta0 = flat_params(tiny_llama)
    results, deltas = [], []
    for budget in (1, 10**6):
        model = copy.deepcopy(tiny_llama)
        cfg = EngineConfig(token_budget=budget, progress=False)
        res = update(model, loss=loss, rollouts=ro, rewards=rewards, lr=1.0, engine_config=cfg, **NO_BAR)
        results.append(res)
        deltas.append(flat_params(model) - theta0)
    w = np.ones(ro.n_rows) if rewards is None else advantages(rewards, ro.group.numpy())
    assert results[0].losses[0] == pytest.approx(naive_loss(tiny_llama, prompts, comps, w), abs=1e-5)
    assert results[0].losses[0] == pytest.approx(results[1].losses[0], abs=1e-6)
    assert results[0].grad_norms[0] == pytest.approx(results[1].grad_norms[0], rel=1e-6)
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=0)
    assert results[0].n_tokens == int(ro.lengths.sum())


def test_sgd_step_moves_parameters_by_the_reported_norm(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    model = copy.deepcopy(tiny_llama).train()
    theta0 = flat_params(model)
    res = update(model, loss="sft", rollouts=ro, lr=0.1, **NO_BAR)
    change = flat_params(model) - theta0
    assert model.training, "the model is left in the mode it was in"
    assert res.param_change_norm > 0
    assert res.param_change_norm == pytest.approx(float(change.double().norm()), rel=1e-5)
    # plain SGD: θ1 − θ0 = −lr · ∇loss, so ‖Δθ‖ = lr · ‖∇‖
    assert res.param_change_norm == pytest.approx(0.1 * res.grad_norms[0], rel=1e-4)
    d = res.to_dict()
    assert isinstance(res, UpdateResult) and d["optimizer"] == "sgd" and d["steps"] == 1
    assert d["mean_reward"] is None and d["losses"] == list(res.losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_reference_p0_gives_the_same_step_and_norm_without_a_copy(tiny_llama, rng, optimizer):
    _, _, ro = random_rollouts(rng)
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = update(a, loss="sft", rollouts=ro, optimizer=optimizer, lr=1e-2, steps=2, **NO_BAR)
    rb = update(b, loss="sft", rollouts=ro, optimizer=optimizer, lr=1e-2, steps=2, reference=tiny_llama, **NO_BAR)
    assert torch.equal(flat_params(a), flat_params(b))
    assert ra.param_change_norm == rb.param_change_norm > 0
    assert torch.equal(flat_params(tiny_llama), flat_params(copy.deepcopy(tiny_llama)))  # left untouched
    for bad in (b, torch.nn.Linear(2, 2)):  # the model itself, another architecture
        with pytest.raises(ValueError, match="untouched copy of the model"):
            update(copy.deepcopy(tiny_llama) if bad is not b else b, loss="sft", rollouts=ro, reference=bad, **NO_BAR)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_steps_decrease_the_sft_loss(tiny_llama, rng, optimizer):
    prompts, comps, ro = random_rollouts(rng)
    model = copy.deepcopy(tiny_llama)
    lr = {"sgd": 0.02, "adamw": 3e-3}[optimizer]
    res = update(model, loss="sft", rollouts=ro, optimizer=optimizer, lr=lr, steps=4, **NO_BAR)
    assert len(res.losses) == len(res.grad_norms) == 4
    assert all(b < a for a, b in zip(res.losses, res.losses[1:])), res.losses
    after = naive_loss(model, prompts, comps, np.ones(ro.n_rows))
    assert after < res.losses[-1]


def test_reinforce_raises_probability_of_rewarded_samples(tiny_llama, rng):
    """One reinforce step moves log p up on rows with A > 0 and down on rows with A < 0 (on average)."""
    prompts, comps, ro = random_rollouts(rng, G=4)
    rewards = np.tile([1.0, 0.0, 0.0, 1.0], 3)
    model = copy.deepcopy(tiny_llama)
    res = update(model, loss="reinforce", rollouts=ro, rewards=rewards, lr=0.5, **NO_BAR)
    assert res.mean_reward == pytest.approx(0.5) and res.active_prompt_fraction == 1.0
    from isdelta.engine import LogProbEngine

    eng = LogProbEngine(progress=False)
    delta = (eng.score(model, ro).logp - eng.score(tiny_llama, ro).logp).numpy()
    A = advantages(rewards, ro.group.numpy())
    assert (A * delta).sum() > 0


def test_equal_rewards_raise_zero_update_error(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    model = copy.deepcopy(tiny_llama)
    theta0 = flat_params(model)
    rewards = np.repeat([1.0, 0.0, 1.0], 4)  # every prompt: all right or all wrong
    with pytest.raises(ZeroUpdateError, match="every advantage is zero"):
        update(model, loss="reinforce", rollouts=ro, rewards=rewards, **NO_BAR)
    assert torch.equal(flat_params(model), theta0)


def test_unreachable_parameters_raise_zero_update_error(tiny_llama, rng):
    """Training only a parameter the loss does not reach gives a zero gradient: refused."""
    _, _, ro = random_rollouts(rng)
    model = copy.deepcopy(tiny_llama)
    for p in model.parameters():
        p.requires_grad_(False)
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ZeroUpdateError, match="gradient is exactly zero"):
        update(model, loss="sft", rollouts=ro, **NO_BAR)


def test_bad_arguments(tiny_llama, rng):
    _, _, ro = random_rollouts(rng)
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="loss must be"):
        update(model, loss="ppo", rollouts=ro, **NO_BAR)
    with pytest.raises(ValueError, match="needs rewards"):
        update(model, loss="reinforce", rollouts=ro, **NO_BAR)
    with pytest.raises(ValueError, match="one per rollout row"):
        update(model, loss="reinforce", rollouts=ro, rewards=[1.0, 0.0], **NO_BAR)
    with pytest.raises(ValueError, match="lr must be > 0"):
        update(model, loss="sft", rollouts=ro, lr=0.0, **NO_BAR)
    with pytest.raises(ValueError, match="optimizer"):
        update(model, loss="sft", rollouts=ro, optimizer="lion", **NO_BAR)


# ---------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    "text, answer, expected",
    [
        (r"so \boxed{12}", "12", 1.0),
        (r"\boxed{12.0}", "12", 1.0),
        (r"\boxed{$12$}", 12, 1.0),
        (r"\boxed{ 1,000 }", "1000", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # nested braces
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{x^{2} + 1}", "x^{2}+1", 1.0),  # whitespace normalised, not numeric
        (r"first \boxed{3} then \boxed{4}", "4", 1.0),  # the LAST box
        (r"first \boxed{3} then \boxed{4}", "3", 0.0),
        (r"\boxed{4} but cut off \boxed{5", "4", 1.0),  # an open box is skipped
        (r"\boxed{-7}", "-7", 1.0),
        ("the answer is 12", "12", 0.0),  # no box
        (r"\boxed{13}", "12", 0.0),
    ],
)
def test_boxed_match(text, answer, expected):
    assert boxed_match(text, answer) == expected


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("she has 1,000 apples", "1000", 1.0),
        ("total: 1,234,567.5", "1234567.5", 1.0),
        ("it drops to -3.5 degrees", "-3.5", 1.0),
        ("from 3 to 7 so 3-5", "5", 1.0),  # a range, not −5
        ("first 4 then 12.", "12", 1.0),  # sentence dot, last number
        ("answer 12.0", "12", 1.0),
        ("cost $72", "He pays 8*9 = 72 dollars.\n#### 72", 1.0),  # GSM8K reference
        ("x2 is the variable", "2", 0.0),  # digits inside a word
        ("no numbers here", "3", 0.0),
        ("the answer is 3", "three", 0.0),
        ("7, 8, 9", "9", 1.0),
    ],
)
def test_answer_match(text, answer, expected):
    assert answer_match(text, answer) == expected


def test_rewards_registry():
    assert REWARDS == {"boxed_match": boxed_match, "answer_match": answer_match}
    assert advantages(np.array([1.0, 0.0, 2.0, 2.0]), np.array([0, 0, 1, 1])).tolist() == [0.5, -0.5, 0, 0]
