"""``EntropyDeltaMixin`` on verl's ``RayPPOTrainer``, with verl's real actor worker (FSDP2, CPU).

Each test runs the slice of ``RayPPOTrainer.fit`` between the rollout and the metrics: the
old-log-prob pass, GRPO advantages (verl's ``compute_grpo_outcome_advantage``), the actor update,
and ``reduce_metrics`` of what ``_update_actor`` returned.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("verl.trainer", reason="verl lives in its own environment: make test-verl")

from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils.metric import reduce_metrics

from isdelta.integrations.verl import EntropyDeltaMixin
from isdelta.training import MonitorWarning

PROMPTS = 4  # tests/with_verl/conftest.py: prompts of a step, 4 responses each


class Trainer(EntropyDeltaMixin, RayPPOTrainer):
    """What the README tells a legacy-trainer user to write."""


def trainer_for(config, worker, tokenizer, **options) -> Trainer:
    """The trainer without ``__init__`` (it builds Ray resource pools): the state its
    ``_compute_old_log_prob`` / ``_update_actor`` read, with the worker in this process."""
    t = object.__new__(Trainer)
    t.config, t.actor_rollout_wg, t.tokenizer, t.global_steps = config, worker, tokenizer, 1
    t.isdelta_options = options
    return t


def rewards(batch) -> torch.Tensor:
    """A rule reward on the last counted token (even ids), as a token-level score tensor."""
    mask = batch.batch["response_mask"]
    last = mask.sum(-1) - 1
    score = (batch.batch["responses"][torch.arange(len(last)), last] % 2 == 0).float()
    out = torch.zeros(mask.shape)
    out[torch.arange(len(last)), last] = score
    return out


def fit_step(trainer, batch, *, bypass: bool = False) -> dict:
    """``RayPPOTrainer.fit`` from "Recompute old_log_probs" to the step's actor metrics."""
    if bypass:  # verl's rollout-correction bypass mode: old log-probs are the rollout's
        batch.batch["old_log_probs"] = batch.batch["rollout_log_probs"]
    else:
        old, _ = trainer._compute_old_log_prob(batch)
        old.batch.pop("entropys")
        batch = batch.union(old)
    adv, ret = core_algos.compute_grpo_outcome_advantage(
        rewards(batch), batch.batch["response_mask"], index=batch.non_tensor_batch["uid"]
    )
    batch.batch["advantages"], batch.batch["returns"] = adv, ret
    out = trainer._update_actor(batch)
    return reduce_metrics(out.meta_info["metrics"])


def verl_pass(trainer, batch) -> tuple[np.ndarray, np.ndarray]:
    """verl's own old-log-prob pass on the actor now (the method the mixin wraps)."""
    out, _ = RayPPOTrainer._compute_old_log_prob(trainer, batch)
    return out.batch["old_log_probs"].double().numpy(), out.batch["entropys"].double().numpy()


@pytest.fixture
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_dir)


def test_logged_delta_is_the_library_headline_on_verls_arrays(
    library_headline, tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir)
    trainer = trainer_for(config, make_worker(config), tokenizer)
    batch = data_proto(sampled)
    lp0, h0 = verl_pass(trainer, batch)  # p0, as the mixin will keep it
    metrics = fit_step(trainer, copy.deepcopy(batch))
    lp1, h1 = verl_pass(trainer, batch)  # p1, as the mixin scored it
    mask = batch.batch["response_mask"].numpy()
    want = library_headline(
        lp0, h0, lp1, h1, mask, sampled["uid"], sampled["rollout_log_probs"].numpy(), len(tokenizer)
    )
    assert "actor/pg_loss" in metrics and "actor/grad_norm" in metrics  # verl's own update ran
    assert want.valid_tok, want.reason
    assert metrics["entropy/valid_tok"] == 1.0 and metrics["entropy/valid"] == float(want.valid)
    assert metrics["entropy/method"] == float(want.code)
    assert metrics["entropy/delta_tok"] == want.delta_tok.value
    assert metrics["entropy/delta_tok_ci_low"] == want.delta_tok.ci_low
    if want.valid:
        assert metrics["entropy/delta"] == want.delta.value
        assert metrics["entropy/delta_ci_high"] == want.delta.ci_high
    assert abs(metrics["entropy/delta_tok"]) > 1e-4  # lr 1e-3 moves the tiny model
    res = trainer.isdelta_monitor().results[-1]
    assert res.step == 1 and res.n_rows == PROMPTS * 4
    assert any("sampler gap" in w for w in res.warnings)  # q: the sampler's own log-probs


def test_an_update_that_changes_nothing_logs_zero(
    tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir)
    config.actor_rollout_ref.actor.optim.lr = 0.0
    trainer = trainer_for(config, make_worker(config), tokenizer)
    metrics = fit_step(trainer, data_proto(sampled, with_q=False))
    assert metrics["entropy/valid"] == 1.0 and metrics["entropy/valid_tok"] == 1.0
    assert metrics["entropy/delta"] == 0.0 and metrics["entropy/delta_tok"] == 0.0
    assert metrics["entropy/delta_ci_low"] == 0.0 == metrics["entropy/delta_ci_high"]
    assert metrics["entropy/h0_tok"] == metrics["entropy/h1_tok"] > 0


def test_a_truncating_sampler_is_refused_and_training_goes_on(
    tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir, top_p=0.9)
    trainer = trainer_for(config, make_worker(config), tokenizer)
    with pytest.warns(MonitorWarning, match=r"top_p=0.9.*Set actor_rollout_ref.rollout.top_p=1.0"):
        metrics = fit_step(trainer, data_proto(sampled))
    assert metrics["entropy/valid"] == 0.0 and metrics["entropy/valid_tok"] == 0.0
    assert math.isnan(metrics["entropy/delta"]) and math.isnan(metrics["entropy/delta_tok"])
    assert "actor/pg_loss" in metrics


def test_a_failing_p1_pass_stays_out_of_the_training_loop(
    tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir)
    worker = make_worker(config)
    trainer = trainer_for(config, worker, tokenizer)
    real, calls = worker.compute_log_prob, []

    def flaky(data):
        calls.append(1)
        if len(calls) == 2:  # the pass after the update
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(data)

    worker.compute_log_prob = flaky
    with pytest.warns(MonitorWarning, match="the p1 pass on the actor failed: RuntimeError"):
        metrics = fit_step(trainer, data_proto(sampled))
    assert metrics["entropy/valid"] == 0.0 and "actor/pg_loss" in metrics
    assert "simulated" in trainer.isdelta_monitor().results[-1].reason
    strict = trainer_for(config, worker, tokenizer, strict=True)
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        fit_step(strict, data_proto(sampled))


def test_bypass_mode_scores_p0_before_the_update(
    tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir)
    trainer = trainer_for(config, make_worker(config), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        metrics = fit_step(trainer, data_proto(sampled), bypass=True)
    assert metrics["entropy/valid_tok"] == 1.0
    assert any("bypass mode" in w for w in trainer.isdelta_monitor().results[-1].warnings)


def test_every_k_steps_costs_nothing_in_between(
    tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config, data_proto
):
    config = verl_config(tiny_qwen2_dir)
    config_every = copy.deepcopy(config)
    from omegaconf import open_dict

    with open_dict(config_every):
        config_every.isdelta = {"every": 2}  # +isdelta.every=2 on verl's command line
    worker = make_worker(config)
    trainer = trainer_for(config_every, worker, tokenizer)
    real, calls = worker.compute_log_prob, []
    worker.compute_log_prob = lambda data: calls.append(1) or real(data)
    first = fit_step(trainer, data_proto(sampled))
    n_first = len(calls)
    trainer.global_steps = 2
    second = fit_step(trainer, data_proto(sampled))
    assert "entropy/delta_tok" in first and n_first == 2  # verl's pass + the p1 pass
    assert not any(k.startswith("entropy/") for k in second) and len(calls) - n_first == 1
    assert trainer.isdelta_monitor().config.every == 2
