"""ΔH of every GRPOTrainer optimizer step, in the trainer's own logs.

>>> trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
>>> callback = attach(trainer)             # doctest: +SKIP
>>> trainer.train()                        # logs entropy/delta, entropy/delta_ci_low, … per step
>>> callback.results[-1].delta             # doctest: +SKIP

How it hooks in (checked against TRL 1.16's ``GRPOTrainer`` and transformers' ``Trainer``)::

    optimizer step k
      micro-batch 1   training_step → _prepare_inputs ─▶ [wrapped] monitor.before(inputs)  p0
                                     compute_loss, backward
      micro-batch 2   … (parameters unchanged during accumulation: still p0)
      optimizer.step(); global_step += 1
      on_step_end     [callback] monitor.after(all snapshots of step k)                    p1
                      scalars appended to trainer._metrics["train"]
      _maybe_log_save_evaluate → GRPOTrainer.log averages _metrics and logs them with its own

``_prepare_inputs`` returns the micro-batch the loss sees, with ``prompt_ids``, ``prompt_mask``
(left-padded), ``completion_ids``, ``completion_mask`` (right-padded, counted up to the first
EOS) and, when TRL computes them, ``old_per_token_logps``. It is wrapped on the trainer instance
(no subclass needed). ``on_step_end`` runs after ``optimizer.step()`` and before the trainer
logs, so ΔH lands in the same log line as the step's loss and rewards; GRPO's averaging skips
the NaN of invalid steps and ``entropy/valid`` becomes the fraction of valid steps. Two verdicts
are logged (:meth:`isdelta.training.MonitorResult.scalars`): ``entropy/valid`` for ΔH per
sequence and ``entropy/valid_tok`` for the per-token rate; on long completions a step may log
only the per-token headline (``entropy/delta_tok``, its SE and CI) with the per-sequence ones NaN.

The rows must be samples of p0, the model before the step. GRPO generates every
``steps_per_generation × num_iterations`` micro-batches and reuses the rollouts in between; only
micro-batches generated during the current optimizer step are snapshotted. With
``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps`` some steps see
only rollouts of an earlier model: their results are invalid with the reason "stale".
GRPO shuffles a generation batch before splitting it into micro-batches, so one prompt's rows
are spread over micro-batches (and over ranks): groups are keyed by the prompt tokens, and a
prompt with a single row in a step is left out.

With ``attach(trainer, fresh=k)`` the snapshot of a micro-batch is k new samples of p0 for each
of its distinct prompts (HF ``generate`` on the unwrapped model, the caller's RNG untouched), not
its rows: rows the step trains on carry its self-influence (:mod:`isdelta.training.fresh`).

The engine scores with the sampler's temperature, top-k and top-p, read from the trainer's
arguments (and ``generation_kwargs``). Samplers isdelta cannot score exactly (min-p, repetition
penalty, n-gram bans, …) are refused by :func:`attach`. Tool-calling rollouts (tokens written by
a tool are not samples of the model) and multimodal inputs give invalid results.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback

from isdelta.engine.logprob import EngineConfig
from isdelta.training.fresh import distinct_prompts, fresh_rows
from isdelta.training.guard import EntropyGuard
from isdelta.training.monitor import BATCH_KEYS, EntropyMonitor, MonitorResult, Snapshot

__all__ = ["EntropyCallback", "attach", "engine_config_from_args"]

# generation options that change the sampling distribution beyond temperature / top-k / top-p,
# with their neutral value: isdelta's engine cannot score them, so ΔH would be biased
_UNSUPPORTED = {
    "min_p": None,
    "repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "top_h": None,
}
# inputs the engine cannot pass to the model, or rows that are not samples of the model
_INPUTS_UNSUPPORTED = {
    "tool_mask": "tool-calling rollouts: tokens written by a tool are not samples of the model",
    "pixel_values": "multimodal inputs: the engine scores text-only forwards",
}


def engine_config_from_args(
    args, generation_kwargs: Mapping[str, Any] | None = None, model_generation_config=None, **overrides
) -> EngineConfig:
    """The engine options that score what ``GRPOTrainer`` samples.

    Parameters
    ----------
    args : trl.GRPOConfig
        Its ``temperature``, ``top_k`` (0: off), ``top_p`` and ``generation_kwargs``.
    generation_kwargs : mapping, optional
        The trainer's effective generation kwargs (``trainer.generation_kwargs``); default
        ``args.generation_kwargs``. They override ``args``.
    model_generation_config : transformers.GenerationConfig, optional
        The model's own defaults, which ``generate`` applies to every option the trainer leaves
        unset; checked for processors too.
    **overrides
        Other :class:`EngineConfig` fields (``token_budget``, …).

    Raises
    ------
    ValueError
        The sampler uses a logit processor the engine cannot score (min-p, repetition penalty,
        …): ΔH would be biased. Set it to its neutral value to use the monitor.
    """
    kw = dict(getattr(args, "generation_kwargs", None) or {})
    kw.update(generation_kwargs or {})
    temperature = float(kw.get("temperature", args.temperature))
    top_k = int(kw.get("top_k", args.top_k) or 0)
    top_p = float(kw.get("top_p", args.top_p) if kw.get("top_p", args.top_p) is not None else 1.0)
    bad = []
    for name, neutral in _UNSUPPORTED.items():
        value = kw.get(name, getattr(args, name, None))
        if value is None and model_generation_config is not None:
            value = getattr(model_generation_config, name, None)
        if value is not None and value != neutral and not (neutral is None and value in (0, 0.0, [])):
            bad.append(f"{name}={value!r}")
    if bad:
        raise ValueError(
            f"the GRPO sampler uses {', '.join(bad)}: isdelta's engine scores temperature, top-k and "
            "top-p only, so the importance weights (and ΔH) would be biased. Set them to their "
            "neutral values (min_p=None, repetition_penalty=1.0, …) to monitor entropy."
        )
    return EngineConfig(
        temperature=temperature, top_k=top_k or None, top_p=top_p, include_eos=True, progress=False, **overrides
    )


class EntropyCallback(TrainerCallback):
    """Snapshots p0 on each fresh training micro-batch and logs ΔH at ``on_step_end``.

    Made by :func:`attach`. ``results`` holds a :class:`MonitorResult` per measured step, with
    ``step`` set to the trainer's ``global_step``.
    """

    def __init__(
        self, trainer, monitor: EntropyMonitor, guard: Mapping[str, Any] | None = None, fresh: int = 0
    ) -> None:
        self.trainer, self.monitor, self.fresh = trainer, monitor, int(fresh)
        self.guard_options = None if guard is None else dict(guard)
        self.guard: EntropyGuard | None = None  # made at the first step (the trainer's optimizer exists then)
        self.results: list[MonitorResult] = []
        self._pending: list[Snapshot] = []
        self._skip_reason: str | None = None
        self._fresh_error: str | None = None
        self._stale = 0
        self._generated_at: int | None = None
        self._original_prepare = trainer._prepare_inputs
        trainer._prepare_inputs = self._prepare_inputs

    def detach(self) -> None:
        """Undo :func:`attach`: restore ``_prepare_inputs`` and remove the callback."""
        self.trainer._prepare_inputs = self._original_prepare
        self.trainer.remove_callback(self)

    # ------------------------------------------------------------------ p0
    def _prepare_inputs(self, generation_batch):
        """GRPO's ``_prepare_inputs``, then a p0 snapshot of the micro-batch it returns."""
        trainer = self.trainer
        buffer = getattr(trainer, "_buffered_inputs", None)
        inputs = self._original_prepare(generation_batch)
        if not trainer.model.training:  # evaluation batches are not part of an optimizer step
            return inputs
        if getattr(trainer, "_buffered_inputs", None) is not buffer:
            self._generated_at = trainer.state.global_step  # rollouts of the current parameters
        self._observe(inputs)
        return inputs

    def _observe(self, inputs: Mapping[str, Any]) -> None:
        """Snapshot one training micro-batch if its rows are samples of the current p0."""
        if self._generated_at != self.trainer.state.global_step:
            self._stale += 1
            return
        for key, why in _INPUTS_UNSUPPORTED.items():
            if inputs.get(key) is not None:
                self._skip_reason = why
                return
        batch = {k: inputs[k] for k in BATCH_KEYS if k in inputs}
        batch["completion_mask"] = self._counted_mask(inputs)
        batch["eos_token_ids"] = list(self.trainer.eos_token_ids)
        if self.fresh and self.monitor.due():  # (a step `every` skips draws nothing)
            self._observe_fresh(batch)
            return
        old = inputs.get("old_per_token_logps")
        if old is not None and self.monitor.config.engine.transform.truncates:
            old = None  # TRL's log-probs apply the temperature only, not top-k / top-p
        self._pending.append(self.monitor.before(batch, old_logp=old))

    def _observe_fresh(self, batch: Mapping[str, Any]) -> None:
        """Snapshot ``fresh`` new samples of p0 for the micro-batch's prompts (``fresh=``)."""
        trainer = self.trainer
        unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", lambda m: m)
        try:
            rows = fresh_rows(
                unwrap(trainer.model), trainer.processing_class,
                distinct_prompts(batch["prompt_ids"], batch["prompt_mask"]), num_samples=self.fresh,
                engine_config=self.monitor.config.engine, max_new_tokens=trainer.args.max_completion_length,
                eos_token_ids=list(trainer.eos_token_ids),
                seed=(int(trainer.args.seed) * 1_000_003 + trainer.state.global_step) * 1_009 + len(self._pending),
            )  # fmt: skip
        except Exception as exc:  # the failure policy: the step is reported, never raised
            if self.monitor.config.strict:
                raise
            self._fresh_error = f"sampling fresh rows of p0 failed: {type(exc).__name__}: {exc}"
            return
        self._pending.append(self.monitor.before(rows))

    def _counted_mask(self, inputs) -> torch.Tensor:
        """The completion mask with truncated rows restored (``mask_truncated_completions``).

        TRL zeroes the mask of completions cut at ``max_completion_length`` to keep them out of
        the loss; they are still samples of p0 (all their tokens count, DESIGN.md §3), and
        leaving them out would bias ΔH towards completions that stop.
        """
        mask = inputs["completion_mask"]
        args = self.trainer.args
        if not getattr(args, "mask_truncated_completions", False):
            return mask
        empty = mask.sum(-1) == 0  # [N]: only truncated rows (every completion has >= 1 token)
        if not empty.any():
            return mask
        mask = mask.clone()
        mask[empty, : min(mask.shape[1], int(args.max_completion_length))] = 1
        return mask

    # ------------------------------------------------------------------ the guard
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After backward and clipping: predict this step's ΔH and scale the lr (``guard=``)."""
        if self.guard_options is not None:
            if self.guard is None:
                cfg = self.monitor.config
                opts = {"engine_config": cfg.engine, "strict": cfg.strict, **self.guard_options}
                self.guard = EntropyGuard(self.trainer.model, self.trainer.optimizer, **opts)
            self.guard.prepare(self._pending)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.guard is not None:
            self.guard.finish()
        return control

    # ------------------------------------------------------------------ p1
    def on_step_end(self, args, state, control, **kwargs):
        """Score p1 on the step's snapshots, estimate ΔH and hand the scalars to the trainer."""
        if self._fresh_error is not None:  # the step is not measured on part of its prompts
            result = self.monitor.skip(self._fresh_error)
        elif self._pending:
            result = self.monitor.after(self._pending)
        elif self._skip_reason is not None:
            result = self.monitor.skip(self._skip_reason)
        elif self._stale:
            result = self.monitor.skip(
                "stale: this step trained on rollouts generated before the previous optimizer "
                "step (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps), "
                "which are not samples of p0."
            )
        else:
            result = self.monitor.skip("no training micro-batch was seen in this step")
        self._pending, self._skip_reason, self._stale, self._fresh_error = [], None, 0, None
        if result is None:
            return control
        result = replace(result, step=int(state.global_step))
        self.results.append(result)
        scalars = result.scalars()
        if self.guard is not None and self.guard.observe(result) is not None:
            scalars |= self.guard.scalars()
        self._log(scalars)
        return control

    def _log(self, scalars: dict[str, float]) -> None:
        """Into GRPO's metric store (logged with its own metrics), else straight to ``log``."""
        metrics = getattr(self.trainer, "_metrics", None)
        if isinstance(metrics, dict) and "train" in metrics:
            for key, value in scalars.items():
                metrics["train"][key].append(value)
        else:
            self.trainer.log(scalars)


def attach(
    trainer,
    *,
    token_budget: int | None = None,
    fp32: bool = False,
    guard: Mapping[str, Any] | None = None,
    fresh: int | None = None,
    **options,
) -> EntropyCallback:
    """Monitor ΔH of every optimizer step of a TRL ``GRPOTrainer`` (call before ``train()``).

    Parameters
    ----------
    trainer : trl.GRPOTrainer
    token_budget : int, optional
        Tokens per scoring forward (default: the engine's).
    fp32 : bool
        Score the fp32 weights with autocast off (``EngineConfig.fp32``): set it when the trainer
        runs in bf16 mixed precision (``bf16=True``) on a float32 model and the steps are small
        (AdamW lr ≲ 1e-5), where bf16 rounding of the weights swamps the step.
    guard : dict, optional
        Hold each step's ΔH in a band (:class:`isdelta.training.EntropyGuard`): its options,
        ``band`` required, e.g. ``guard={"band": (-0.02, float("inf"))}``. The prediction runs
        after backward and clipping (``on_pre_optimizer_step``), the lr is scaled for that
        step only, and ``entropy/guard_*`` join the step's log line.
    fresh : int, optional
        Read each step on ``fresh`` new samples of p0 per prompt of the batch (≥ 2), drawn
        before the step with HF ``generate`` under the sampler's transform, instead of on the
        rows the step trains on (0). Rows a step trained on carry that step's self-influence:
        on SmolLM2 GRPO steps of 48 rows, ΔH read on them was 3.3–3.5× the realised ΔH on two
        batches of three and the guard's ΔH₁ 4–14× what fresh rows read
        (:mod:`isdelta.training.fresh`). Costs ``fresh`` generations per prompt per step. Not given: the trained rows, with a warning saying so.
    **options
        Any option of :class:`isdelta.training.MonitorConfig` but the engine (made from the
        trainer's sampling arguments) and the stop ids (the trainer's): ``every``, ``weights``,
        ``level``, ``strict``, ``rao_blackwell``, ``per_decision``, …. With
        ``rao_blackwell="auto"`` TRL's ``old_per_token_logps`` (present when generation and
        optimizer steps are misaligned) are reused for log p0 and the plain estimates are logged.

    Returns
    -------
    EntropyCallback
        Already registered with the trainer; ``.results`` fills up during training.

    Raises
    ------
    TypeError
        ``trainer`` is not a GRPOTrainer (it lacks ``_prepare_inputs``, ``eos_token_ids``).
    ValueError
        The sampler uses a logit processor the engine cannot score.
    """
    missing = [
        a for a in ("_prepare_inputs", "eos_token_ids", "args", "model", "add_callback") if not hasattr(trainer, a)
    ]
    if missing:
        raise TypeError(
            f"trainer: expected a trl.GRPOTrainer; {type(trainer).__name__} lacks "
            f"{missing}. For other loops use isdelta.training.EntropyMonitor directly."
        )
    extra = {"fp32": bool(fp32)} | ({} if token_budget is None else {"token_budget": int(token_budget)})
    cfg = engine_config_from_args(
        trainer.args,
        getattr(trainer, "generation_kwargs", None),
        getattr(trainer.model, "generation_config", None),
        **extra,
    )
    monitor = EntropyMonitor(trainer.model, engine_config=cfg, eos_token_ids=list(trainer.eos_token_ids), **options)
    if guard is not None:  # its options are checked now, not at the first step
        if not isinstance(guard, Mapping) or "band" not in guard:
            raise TypeError(f'guard must be a dict of EntropyGuard options with "band"; got {guard!r}.')
        EntropyGuard(trainer.model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), **guard)
    if fresh is None:
        fresh = 0
        warnings.warn(
            "attach: ΔH is read on the rows each step trains on, which carry the step's self-influence "
            "(on SmolLM2 GRPO steps of 48 rows they read 3.3-3.5x the realised ΔH on two batches of three). Pass "
            "fresh=4 (new samples of p0 per prompt, drawn before each step) for an unbiased reading, or "
            "fresh=0 to keep this one.",
            UserWarning,
            stacklevel=2,
        )
    if fresh and (not isinstance(fresh, int) or isinstance(fresh, bool) or fresh < 2):
        raise ValueError(f"fresh must be 0 (read the trained rows) or an int ≥ 2 per prompt; got {fresh!r}.")
    callback = EntropyCallback(trainer, monitor, guard, fresh)
    trainer.add_callback(callback)
    return callback
