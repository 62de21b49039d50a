"""``EntropyDeltaV1Mixin`` on verl's v1 ``PPOTrainer``: TransferQueue batches, verl's real actor worker (FSDP2, CPU).

Each test runs the slice of ``PPOTrainer._step_once`` between the replay buffer's sample and the
metrics: the old-log-prob pass, GRPO advantages, the actor update, on a batch held in TransferQueue.

What is real: a local Ray (2 CPUs) and TransferQueue (its controller and one SimpleStorage unit,
Ray actors; about 20 s to start on 2 shared cores, 3 s to close) holding the step's rollouts; the
trainer mode registry; ``IsdeltaPPOTrainerSync``'s ``_compute_old_log_prob`` / ``_compute_advantage``
/ ``_update_actor`` (verl's code under the mixin's), which read and write TransferQueue; verl's
``upsample_batch_to_divisible_size`` (the padding rows of ``_balance_batch``); and the actor worker's
``compute_log_prob`` / ``update_actor`` behind their ``@register`` wrapper, whose ``tqbridge`` takes
the ``KVBatchMeta``, fetches the rows from TransferQueue and puts the outputs back, as on a Ray worker.

What is stood in: the worker is called in this process, where a ``RayWorkerGroup`` would send the
``KVBatchMeta`` to worker processes (one DP rank: its dispatch splits nothing); the trainer is made
by ``object.__new__`` (``__init__`` builds resource pools, the dataloader and rollout servers) with the
state these methods read; the rollouts are written as verl's agent loop writes them
(``AgentLoopWorkerTQ._agent_loop_postprocess``: one key ``{uid}_{session}_0`` per response, unpadded
fields, its tags, ``rollout_log_probs``; ``rm_scores`` with the reward on the last token, as
``AgentLoopOutput.as_dict``), from samples of the same weights drawn by ``transformers`` instead of a
vLLM / SGLang server, and only the fields that the trainer's methods and the worker read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("verl.trainer", reason="verl lives in its own environment: make test-verl")
pytest.importorskip("transfer_queue", reason="verl's v1 trainer keeps its batches in TransferQueue")

import ray
import transfer_queue as tq
from omegaconf import OmegaConf, open_dict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
from verl.trainer.ppo.v1 import PPOTrainerSync
from verl.trainer.ppo.v1.trainer_base import PPOTrainer, get_trainer_cls
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from isdelta.integrations.verl import IsdeltaPPOTrainerSync


@pytest.fixture(scope="module")
def transfer_queue():
    """A local Ray and TransferQueue for the module (``main_ppo``'s ``tq.init(config.transfer_queue)``)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = {"storage_backend": "SimpleStorage", "SimpleStorage": {"num_data_storage_units": 1}}
    tq.init(OmegaConf.create({"backend": storage}))
    yield
    tq.close()
    ray.shutdown()


@pytest.fixture
def store(transfer_queue):
    """TransferQueue's "train" partition, emptied after the test."""
    yield
    keys = list(tq.kv_list("train").get("train", {}))
    if keys:
        tq.kv_clear(keys=keys, partition_id="train")


@pytest.fixture
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_dir)


def put_rollouts(sampled, rows=None, step: int = 1) -> KVBatchMeta:
    """``sampled`` into TransferQueue as verl's agent loop puts each finished response, and the
    ``KVBatchMeta`` that the replay buffer's ``sample`` hands the trainer (the keys, their tags, "train")."""
    rows = range(len(sampled["uid"])) if rows is None else rows
    keys = []
    for i in rows:
        uid, n_p, n_r = sampled["uid"][i], int(sampled["prompt_mask"][i].sum()), int(sampled["response_mask"][i].sum())
        prompts, responses = sampled["prompts"][i, -n_p:], sampled["responses"][i, :n_r]
        input_ids = torch.cat([prompts, responses])
        rm_scores = torch.zeros(n_r)
        rm_scores[-1] = float(responses[-1] % 2 == 0)  # a rule reward: an even last token
        field = {
            "prompts": prompts,
            "responses": responses,
            "response_mask": torch.ones(n_r, dtype=torch.int64),
            "loss_mask": torch.ones(n_r, dtype=torch.int64),
            "input_ids": input_ids,
            "position_ids": torch.arange(len(input_ids)),
            "rollout_log_probs": sampled["rollout_log_probs"][i, :n_r].float(),
            "rm_scores": rm_scores,
            "uid": uid,
        }
        keys.append(f"{uid}_{list(sampled['uid'][:i]).count(uid)}_0")
        tag = {"status": "success", "prompt_len": n_p, "response_len": n_r, "seq_len": n_p + n_r}
        tag.update(global_steps=step, min_global_steps=step, max_global_steps=step)
        tq.kv_batch_put(keys=keys[-1:], partition_id="train", fields=list_of_dict_to_tensordict([field]), tags=[tag])
    tags = tq.kv_list("train")["train"]
    return KVBatchMeta(partition_id="train", keys=keys, tags=[tags[k] for k in keys])


def stored(batch, *fields) -> list[np.ndarray]:
    """``fields`` of the batch's rows in TransferQueue, right-padded [N, R] float64."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(fields))
    return [data[f].to_padded_tensor(0).double().numpy() for f in fields]


def verl_pass(trainer, batch) -> tuple[np.ndarray, np.ndarray]:
    """verl's own old-log-prob pass on the actor now (the method the mixin wraps): log-probs, entropies."""
    PPOTrainer._compute_old_log_prob(trainer, batch, {})
    return tuple(stored(batch, "old_log_probs", "entropy"))


def grpo_config(verl_config, model_dir):
    config = verl_config(model_dir)
    with open_dict(config):
        config.algorithm.adv_estimator = "grpo"
        config.trainer.v1.trainer_mode = "isdelta"
    return config


def trainer_for(config, worker, tokenizer) -> IsdeltaPPOTrainerSync:
    """The registered trainer without ``__init__``: the state its three methods read, the worker in this process."""
    t = object.__new__(get_trainer_cls(config.trainer.v1.trainer_mode))
    t.config, t.actor_rollout_wg, t.tokenizer, t.global_steps = config, worker, tokenizer, 1
    t.local_trigger_step = 0  # PPOTrainer.step: the first local update of the step
    return t


def fit_step(trainer, batch, metrics: dict, between=None) -> KVBatchMeta:
    """``PPOTrainer._step_once`` from the old-log-prob pass to the actor update (no reference, no critic)."""
    batch.extra_info["temperature"] = trainer.config.actor_rollout_ref.rollout.temperature
    batch = trainer._compute_old_log_prob(batch, metrics)
    if between is not None:
        between(batch)
    batch = trainer._compute_advantage(batch, metrics)
    return trainer._update_actor(batch, metrics)


def test_the_trainer_mode_is_registered():
    """``trainer.v1.trainer_mode=isdelta``: verl's ``get_trainer_cls`` finds the synchronous trainer with the mixin."""
    assert get_trainer_cls("isdelta") is IsdeltaPPOTrainerSync
    assert issubclass(IsdeltaPPOTrainerSync, PPOTrainerSync)


def test_logged_delta_is_the_library_headline_on_transfer_queue_arrays(
    library_headline, store, tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config
):
    config = grpo_config(verl_config, tiny_qwen2_dir)
    trainer = trainer_for(config, make_worker(config), tokenizer)
    p0: dict = {}

    def keep_p0(batch):  # what verl's pass left in TransferQueue, as the mixin keeps it
        p0["lp"], p0["h"], p0["mask"], p0["q"] = stored(
            batch, "old_log_probs", "entropy", "response_mask", "rollout_log_probs"
        )

    metrics: dict = {}
    batch = fit_step(trainer, put_rollouts(sampled), metrics, between=keep_p0)
    res = trainer.isdelta_monitor().results[-1]
    assert metrics["entropy/valid_tok"] == 1.0, res.reason
    assert "actor/entropy" in metrics and "actor/pg_loss" in metrics and "actor/grad_norm" in metrics
    assert np.array_equal(stored(batch, "entropy")[0], p0["h"])  # p1's pass overwrote it; the mixin put p0's back
    lp1, h1 = verl_pass(trainer, batch)  # p1, as the mixin scored it
    want = library_headline(p0["lp"], p0["h"], lp1, h1, p0["mask"], sampled["uid"], p0["q"], len(tokenizer))
    assert want.valid_tok, want.reason
    assert metrics["entropy/valid"] == float(want.valid) and metrics["entropy/method"] == float(want.code)
    assert metrics["entropy/delta_tok"] == want.delta_tok.value
    assert metrics["entropy/delta_tok_ci_low"] == want.delta_tok.ci_low
    if want.valid:
        assert metrics["entropy/delta"] == want.delta.value
    assert abs(metrics["entropy/delta_tok"]) > 1e-4  # lr 1e-3 moves the tiny model
    assert res.step == 1 and res.n_rows == len(sampled["uid"])
    assert any("sampler gap" in w for w in res.warnings)  # q: the rollout's log-probs from TransferQueue


def test_padding_rows_are_left_out(store, tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config):
    """A group that lost two responses: verl pads the batch to its mini-batch size with rows that
    count no token (``is_padding``); the monitor measures the 14 real ones."""
    config = grpo_config(verl_config, tiny_qwen2_dir)
    trainer = trainer_for(config, make_worker(config), tokenizer)
    real = list(range(len(sampled["uid"]) - 2))
    batch = upsample_batch_to_divisible_size(put_rollouts(sampled, real), 16, tokenizer.eos_token_id)
    assert len(batch) == 16 and sum(t.get("is_padding", False) for t in batch.tags) == 2
    metrics: dict = {}
    fit_step(trainer, batch, metrics)
    res = trainer.isdelta_monitor().results[-1]
    assert metrics["entropy/valid_tok"] == 1.0 and "actor/pg_loss" in metrics, res.reason
    assert res.n_rows == len(real)


def test_bypass_mode_scores_p0_before_the_update(store, tiny_qwen2_dir, make_worker, sampled, tokenizer, verl_config):
    """``algorithm.rollout_correction.bypass_mode``: verl's old log-probs are the rollout's and its own
    pass does not run, so the mixin scores p0 itself before the update (one more forward)."""
    config = grpo_config(verl_config, tiny_qwen2_dir)
    config.algorithm.rollout_correction.bypass_mode = True
    trainer = trainer_for(config, make_worker(config), tokenizer)
    metrics: dict = {}
    fit_step(trainer, put_rollouts(sampled), metrics)
    res = trainer.isdelta_monitor().results[-1]
    assert metrics["entropy/valid_tok"] == 1.0 and "actor/pg_loss" in metrics, res.reason
    assert any("bypass mode" in w for w in res.warnings)
