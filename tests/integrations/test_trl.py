"""isdelta.integrations.trl on a real GRPOTrainer: a tiny random Qwen2 + the char tokenizer, on CPU,
offline, two optimizer steps; ΔH with its CI must reach the trainer's own log each step."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs the trl extra: pip install -e '.[trl]'")

from datasets import Dataset  # trl's dependency
from trl import GRPOConfig, GRPOTrainer

from isdelta.integrations.trl import EntropyCallback, attach, engine_config_from_args

PROMPTS = ["1+1=", "2+3=", "7-4=", "3*3=", "9-1=", "4+4=", "6/2=", "5+0="]


@pytest.fixture(scope="module")
def model_dir(tiny_qwen2_dir):
    """A 2-layer Qwen2 with random weights and the char tokenizer, saved as a local checkpoint."""
    return tiny_qwen2_dir


def length_and_ones(completions, **kwargs) -> list[float]:
    """A rule reward with spread within every group: length, plus one per "1"."""
    return [len(c) / 8 + c.count("1") for c in completions]


def grpo(model_dir, tmp_path, **overrides) -> GRPOTrainer:
    args = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "gradient_accumulation_steps": 2,
        "max_completion_length": 8,
        "max_steps": 2,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "temperature": 0.9,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours
        return GRPOTrainer(
            model=str(model_dir),
            reward_funcs=length_and_ones,
            args=GRPOConfig(**args),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )


def train(trainer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()


def test_grpo_logs_delta_h_with_ci_every_step(model_dir, tmp_path):
    """Two accumulated micro-batches per step (a shuffled generation batch: prompts split over
    them); every step logs a finite ΔH inside its CI, measured on all 16 rows."""
    trainer = grpo(model_dir, tmp_path, learning_rate=1e-3)  # steps the headline policy can read
    cb = attach(trainer)
    assert isinstance(cb, EntropyCallback) and cb.monitor.config.engine.temperature == 0.9
    train(trainer)
    logs = [h for h in trainer.state.log_history if "entropy/delta" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h, res in zip(logs, cb.results):
        assert h["entropy/valid"] == 1.0 and h["entropy/n_rows"] == 16 and h["entropy/rao_blackwell"] == 1.0
        assert math.isfinite(h["entropy/delta"]) and h["entropy/delta_se"] > 0
        assert h["entropy/delta_ci_low"] < h["entropy/delta"] < h["entropy/delta_ci_high"]
        assert h["entropy/delta"] == pytest.approx(res.delta.value)
        # p0 was snapshotted before optimizer.step(), p1 after it: the log-ratios are not all 0
        assert res.valid and res.estimate.kl != 0 and res.delta.value != 0
        assert res.n_dropped == 0 and res.estimate.n_prompts == 4
    assert [r.step for r in cb.results] == [1, 2]


def test_stale_rollouts_are_flagged_and_old_logps_reused(model_dir, tmp_path):
    """One generation serves two optimizer steps: step 1 reuses TRL's old_per_token_logps (plain
    estimates), step 2 trains on rollouts of the previous model and is flagged stale."""
    # a small step: plain SNIS (no p0 entropies) with G = 4 reads only while exp(KL) < 4
    trainer = grpo(model_dir, tmp_path, gradient_accumulation_steps=1, steps_per_generation=2, learning_rate=1e-3)
    cb = attach(trainer)
    train(trainer)
    first, second = cb.results
    assert first.valid and not first.rao_blackwell and first.n_rows >= 2
    assert not second.valid and second.reason.startswith("stale")
    logs = [h for h in trainer.state.log_history if "entropy/valid" in h]
    assert [h["entropy/valid"] for h in logs] == [1.0, 0.0]
    assert logs[1]["entropy/delta"] is None  # GRPO's averaging drops the NaN of an invalid step


def test_engine_config_follows_the_sampler():
    args = SimpleNamespace(
        temperature=0.7, top_k=0, top_p=1.0, generation_kwargs={"top_p": 0.9}, min_p=None, repetition_penalty=1.0
    )
    cfg = engine_config_from_args(args, {"top_k": 20})
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.include_eos) == (0.7, 20, 0.9, True)
    with pytest.raises(ValueError, match="min_p=0.05"):
        engine_config_from_args(SimpleNamespace(**{**vars(args), "min_p": 0.05}))
    with pytest.raises(ValueError, match="no_repeat_ngram_size=3"):
        engine_config_from_args(args, model_generation_config=SimpleNamespace(no_repeat_ngram_size=3))
    with pytest.raises(TypeError, match="GRPOTrainer"):
        attach(object())


def test_fp32_scoring_is_passed_on_and_refused_before_training_for_bf16_weights(model_dir, tmp_path):
    trainer = grpo(model_dir, tmp_path)
    cb = attach(trainer, fp32=True)
    assert cb.monitor.config.engine.fp32 and not attach(trainer).monitor.config.engine.fp32
    trainer.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        attach(trainer, fp32=True)


def test_a_large_adamw_step_never_logs_an_impossible_valid_number(model_dir, tmp_path):
    """The field report in miniature: AdamW steps so large that the importance weights collapse.
    Every step that logs valid = 1 respects the physical bounds (entropies ≥ 0, per token ≤ log V,
    ΔH ≥ −H0); every other step logs no number and carries the failed checks and the advice."""
    trainer = grpo(model_dir, tmp_path, learning_rate=0.03, max_steps=3)
    cb = attach(trainer)
    train(trainer)
    logs = [h for h in trainer.state.log_history if "entropy/valid" in h]
    assert len(logs) == len(cb.results) == 3
    log_v = math.log(96)
    for h, res in zip(logs, cb.results):
        if h["entropy/valid"] == 1.0:
            assert h["entropy/h1"] >= 0 and 0 <= h["entropy/h1_tok"] <= log_v and h["entropy/h0_tok"] <= log_v
            assert h["entropy/delta"] >= -h["entropy/h0"] and h["entropy/method"] > 0
            assert res.headline.valid and res.reason is None
        else:
            assert h["entropy/delta"] is None and h["entropy/method"] == 0.0  # the NaN dropped by GRPO
            assert res.headline is not None and "needs" in res.reason and "would make it readable" in res.reason
    assert any(not r.valid for r in cb.results)  # the step was large enough to be unreadable


def test_guard_is_one_argument_scales_the_step_and_logs_what_it_did(model_dir, tmp_path):
    """attach(trainer, guard={"band": …}): the prediction runs before TRL's optimizer.step(), the
    lr is scaled for that step only, and the guard's record joins the step's log line."""
    trainer = grpo(model_dir, tmp_path, learning_rate=1e-3, lr_scheduler_type="constant")
    cb = attach(trainer, guard={"band": (-1e-6, 1e-6), "z": 0.0})  # a band no step of lr 1e-3 fits in
    train(trainer)
    logs = [h for h in trainer.state.log_history if "entropy/guard_scale" in h]
    assert [h["step"] for h in logs] == [1, 2] and len(cb.guard.history) == 2
    for h, d in zip(logs, cb.guard.history):
        assert h["entropy/guard_scale"] == pytest.approx(d.scale) and d.delta1 is not None
        assert d.acted and 0 < d.scale < 1 and "outside" in d.reason
        assert h["entropy/guard_delta1"] == pytest.approx(d.delta1)
        assert abs(d.predicted) == pytest.approx(1e-6, rel=1e-6) or d.scale == cb.guard.min_scale
    assert all(g["lr"] == 1e-3 for g in trainer.optimizer.param_groups)  # restored after each step
    # the step taken was the scaled one: the measured ΔH is about scale × the unguarded step's
    free = grpo(model_dir, tmp_path / "free", learning_rate=1e-3, lr_scheduler_type="constant", max_steps=1)
    free_cb = attach(free)
    train(free)
    first = cb.results[0].delta_tok.value
    assert abs(first) < 0.5 * abs(free_cb.results[0].delta_tok.value)


def test_bad_guard_options_are_refused_at_attach(model_dir, tmp_path):
    trainer = grpo(model_dir, tmp_path)
    with pytest.raises(ValueError, match="contain 0"):
        attach(trainer, guard={"band": (0.1, 0.2)})
    with pytest.raises(TypeError, match="band"):
        attach(trainer, guard={"z": 1.0})


def test_fresh_rows_are_read_instead_of_the_trained_ones_and_leave_training_as_it_was(model_dir, tmp_path):
    """attach(fresh=3): each step is read on 3 new samples of p0 per prompt of each micro-batch,
    drawn before the step; the guard predicts on them too; the run trains exactly as without."""
    trainer = grpo(model_dir, tmp_path, learning_rate=1e-3)
    cb = attach(trainer, fresh=3, guard={"band": (-math.inf, math.inf)})
    seen = []
    original = cb.monitor.before
    cb.monitor.before = lambda batch, old_logp=None: seen.append(batch) or original(batch, old_logp)
    train(trainer)
    assert len(seen) == 4  # 2 steps × 2 micro-batches
    for ro in seen:  # new rows: 3 per distinct prompt, none of them the trained micro-batch's 8
        assert ro.n_rows % 3 == 0 and ro.n_rows <= 12 and torch.bincount(ro.group).tolist() == [3] * (ro.n_rows // 3)
    for res, d in zip(cb.results, cb.guard.history):
        assert res.valid_tok and res.estimate.n_prompts == 4 and d.delta1 is not None
        assert res.n_rows == sum(ro.n_rows for ro in seen[2 * (res.step - 1) : 2 * res.step])
    plain = grpo(model_dir, tmp_path / "plain", learning_rate=1e-3)
    train(plain)
    for (n, a), b in zip(trainer.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), n


def test_fresh_rows_failing_is_a_step_not_read_never_an_error(model_dir, tmp_path, monkeypatch):
    import isdelta.integrations.trl as trl_mod

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    trainer = grpo(model_dir, tmp_path, learning_rate=1e-3, max_steps=1)
    cb = attach(trainer, fresh=2)
    monkeypatch.setattr(trl_mod, "fresh_rows", broken)
    train(trainer)
    (res,) = cb.results
    assert not res.valid and "sampling fresh rows of p0 failed: RuntimeError: out of memory" in res.reason
    with pytest.raises(ValueError, match="fresh must be 0"):
        attach(grpo(model_dir, tmp_path / "b"), fresh=1)
    with pytest.warns(UserWarning, match="rows each step trains on"):
        assert attach(grpo(model_dir, tmp_path / "c")).fresh == 0
    quiet = grpo(model_dir, tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attach(quiet, fresh=0).fresh == 0
