"""EntropyMonitor: ΔH of each optimizer step, from the tensors a trainer already holds.

A GRPO / PPO / SFT loop has, for every micro-batch, left-padded prompt ids, right-padded
completion ids and a completion mask (and often the old per-token log-probs). The monitor
snapshots p0 on them before the optimizer step and scores the same rows under p1 after it::

    snap = monitor.before(batch)           # p0: log p0 and H_t per position (one no-grad forward)
    loss.backward(); opt.step()            # parameters change: p0 → p1
    result = monitor.after(snap)           # p1: log p1(x_i) and Σ_t H_t  (one no-grad forward)
    logger.log(result.scalars())           # entropy/delta, entropy/delta_ci_low, …

or ``with monitor.step(batch) as s: …`` then ``s.result``. With gradient accumulation call
``before`` on every micro-batch of the step and ``after`` once with the list of snapshots: the
parameters do not change between micro-batches, so all of them are samples of the same p0.

The rows must be samples of p0, the model before this optimizer step (on-policy RL, fresh
rollouts; for SFT on reference data ΔH is not defined by this estimator). Rows whose prompt has
only one row in the step are left out (SNIS normalises weights within a prompt, and one row gives
no information about H(p1)); ``result.n_dropped`` counts them.

The headline is chosen by the policy of DESIGN.md §5.4 (:func:`isdelta.estimators.headline`):
the per-decision estimator with a control variate (``per_decision="cv"``,
:func:`isdelta.estimators.estimate_tokens`: each position's exact next-token entropy under p1
weighted by the ratio of its *prefix* rather than of the whole sequence), then the
self-normalised per-decision one, then sequence-level SNIS, the first whose preconditions hold on
the step's samples and whose numbers respect the physical bounds of entropy; when none does, the
result is invalid with the reason and what would make the step readable. SNIS is reported beside
the headline (``result.delta_snis``, ``entropy/delta_snis``). The per-decision estimators need
p0's per-position entropies, i.e. the p0 forward below.

The cost of the p0 forward: the trainer's own per-token log-probs of the sampled tokens
(``old_logp``, e.g. TRL's ``old_per_token_logps``) give log p0(x_i) for free, but not the entropy
of the full next-token distribution at each position, which the Rao–Blackwellised (RB, lower
variance) estimates need. ``rao_blackwell="auto"`` (default) therefore reuses ``old_logp`` and
reports the plain estimates when it is given, and runs the p0 forward for RB estimates when it is
not; ``"always"`` runs the forward anyway (``old_logp`` is then only checked against the engine's
log-probs: a gap means the trainer scores a different transform than it samples); ``"never"``
reports plain estimates always.

Input checks (:mod:`isdelta.training.inputs`, the batch audit's own checks): every micro-batch's
mask and prompts are checked against DESIGN.md §2–§3 before any forward. A mask that only leaves
out the first stop tokens (``completion_ids != pad_id`` with pad == eos) is corrected where that
is sure, and the result says so; any other finding refuses the step with the finding and its fix.
The first ``old_logp`` to be reused is checked against the model; if it disagrees, p0 is rescored.

Failure policy: nothing the monitor does raises into the training loop unless ``strict=True``.
Bad input (to ``before`` or ``after``), non-finite scores, out-of-memory, an exception in scoring
or estimation, or k̂ > 1 give a result with ``valid=False`` and the reason (warned once per kind);
``strict=True`` raises instead, also where a mask would be corrected. Errors a constructor can
see (a model that is not a module, unknown options, stop or pad ids outside the vocabulary) raise
there. The model's train/eval
mode (per module), ``requires_grad`` flags, ``.grad`` tensors and the torch RNG state (CPU, and
CUDA where initialised) are restored exactly after each forward.

In a data-parallel run each rank calls ``before``/``after`` on its own shard; ``after`` gathers
the rows of all ranks (:func:`isdelta.training.gather_rows`) so every rank estimates the global
ΔH. Group ids are keyed by the prompt tokens by default, which makes them global.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import torch

from isdelta.engine.logprob import EngineConfig, check_fp32_weights
from isdelta.engine.rollouts import Rollouts
from isdelta.training.distributed import all_gather, world_size
from isdelta.training.inputs import BATCH_KEYS, OLD_LOGP_GAP_WARN, InputChecks, snapshot_list
from isdelta.training.model_state import free_memory, preserved
from isdelta.training.options import MonitorConfig
from isdelta.training.pinned import PinnedEngine
from isdelta.training.rows import Snapshot, merge, row_sums, rows_of
from isdelta.training.verdict import MonitorError, MonitorResult, MonitorWarning, describe, judge_rows

__all__ = [
    "BATCH_KEYS",
    "EntropyMonitor",
    "MonitorConfig",
    "MonitorError",
    "MonitorResult",
    "MonitorStep",
    "MonitorWarning",
    "Snapshot",
]


class MonitorStep:
    """``with monitor.step(batch) as s: …`` → ``s.snapshot`` on entry, ``s.result`` on exit.

    When the body raises, nothing is scored (the step is counted, the exception propagates).
    """

    def __init__(self, monitor: EntropyMonitor, batch, old_logp=None) -> None:
        self.monitor, self.batch, self.old_logp = monitor, batch, old_logp
        self.snapshot: Snapshot | None = None
        self.result: MonitorResult | None = None

    def __enter__(self) -> MonitorStep:
        self.snapshot = self.monitor.before(self.batch, old_logp=self.old_logp)
        self.batch = self.old_logp = None  # the snapshot holds what is needed
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.result = self.monitor.after(self.snapshot)
        else:
            self.monitor.skip(f"the training step raised {exc_type.__name__}")
        return False


# ---------------------------------------------------------------------------- the monitor
class EntropyMonitor:
    """Measure ΔH = H(p1) − H(p0) of each optimizer step on samples of p0 snapshotted before it.

    Rows the step trains on give a reading biased by the step's self-influence (each row's own
    gradient moved it): pass fresh rows of p0 for the batch's prompts where the number must be
    unbiased (:func:`isdelta.training.fresh_rows`; on SmolLM2 GRPO steps of 48 rows the trained
    rows read 3.3–3.5× the realised ΔH on two batches of three).

    ``EntropyMonitor(model, engine_config=EngineConfig(temperature=0.9), weights="psis", ...)``.

    Parameters
    ----------
    model : HF causal LM (or a DDP / torch.compile wrapper of one)
        The model being trained; p0 is it at ``before``, p1 at ``after``.
    config : MonitorConfig, optional
        All options at once; or any of them as keywords (``**options``).
    engine_config : EngineConfig, optional
        ``MonitorConfig.engine``: how rows are scored (the sampler's transform). With
        ``fp32=True`` (mixed-precision training with fp32 weights, small steps) a model whose
        weights are not float32 is refused here, with a ValueError. ``fused="auto"`` is decided
        once, at the first scored batch, for every step (:attr:`fused`).
    **options
        Any other field of :class:`MonitorConfig` (``weights``, ``clip``, ``level``, ``prompts``,
        ``every``, ``strict``, ``rao_blackwell``, ``group_by``, ``distributed``, ``per_decision``,
        ``eos_token_ids``), each documented there.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: MonitorConfig | None = None,
        *,
        engine_config: EngineConfig | None = None,
        **options,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module (an HF causal LM); got {type(model).__name__}.")
        unknown = sorted(set(options) - {f.name for f in fields(MonitorConfig)} - {"engine"})
        if unknown or "engine" in options:
            valid = ["engine_config"] + [f.name for f in fields(MonitorConfig) if f.name != "engine"]
            raise TypeError(f"EntropyMonitor got unknown option(s) {unknown or ['engine']}; valid: {', '.join(valid)}.")
        if engine_config is not None:
            options["engine"] = engine_config
        self.config = replace(config or MonitorConfig(), **options)
        if self.config.engine.fp32:
            check_fp32_weights(model)  # refused here, before the training loop, not at a step
        self.model = model
        self._warned: set[str] = set()
        self._inputs = InputChecks(model, self.config, self._warn_once)  # stop ids outside the vocabulary raise
        self.eos_token_ids, self.pad_token_id = self._inputs.eos_token_ids, self._inputs.pad_token_id
        self._engine = PinnedEngine(self.config.engine)  # p0 and p1 of every step on one path
        self._n_steps = 0
        self._token = uuid.uuid4().hex  # marks this monitor's snapshots

    @property
    def n_steps(self) -> int:
        """Steps completed (``after`` and ``skip`` calls)."""
        return self._n_steps

    @property
    def fused(self) -> bool | None:
        """Whether every step is scored with the compiled chunk statistics (``training/pinned.py``):
        decided at the first scored batch; None before it."""
        return self._engine.fused

    def due(self) -> bool:
        """Whether the current step will be measured (``every``)."""
        return self._n_steps % self.config.every == 0

    def step(self, batch, old_logp=None) -> MonitorStep:
        """Context-manager form of ``before``/``after`` (see :class:`MonitorStep`)."""
        return MonitorStep(self, batch, old_logp)

    # ------------------------------------------------------------------ p0
    def before(self, batch: Rollouts | Mapping[str, Any], old_logp=None) -> Snapshot:
        """Snapshot p0 on one micro-batch, before the optimizer step.

        Parameters
        ----------
        batch : Rollouts, or a mapping with ``prompt_ids`` [N, P_len] (left-padded),
            ``prompt_mask`` [N, P_len], ``completion_ids`` [N, C] (right-padded) and
            ``completion_mask`` [N, C] (real tokens up to and including the first stop token);
            optionally ``completion_lengths`` [N] (sampled tokens per row: makes the mask check
            exact), ``eos_token_ids``, ``group`` [N] and ``num_generations`` (used with
            ``group_by="given"``). Other keys (advantages, …) are ignored. Checked first
            (:mod:`isdelta.training.inputs`): corrected where the fix is sure, else refused.
        old_logp : Tensor or ndarray [N, C], optional
            The trainer's per-token log p0 of ``completion_ids`` under the sampling transform
            (fp32 preferred); read on counted tokens only. The first one is checked against
            the model; if it disagrees, p0 is rescored from then on.

        Returns
        -------
        Snapshot
            Pass it (or a list of a step's snapshots) to :meth:`after`.
        """
        step = self._n_steps
        if step % self.config.every:
            return Snapshot(step, measured=False, monitor=self._token)
        t0 = time.perf_counter()
        try:
            rollouts, old, notes = self._inputs.check(batch, old_logp, step)
        except Exception as exc:  # the failure policy: never break the training loop
            if self.config.strict:
                raise
            reason = (
                str(exc) if isinstance(exc, (TypeError, ValueError)) else f"checking the batch failed: {describe(exc)}"
            )
            return Snapshot(step, True, seconds=time.perf_counter() - t0, error=reason, monitor=self._token)
        try:
            fields = self._score_p0(rollouts, old)
        except Exception as exc:
            if self.config.strict:
                raise
            free_memory(exc)
            error = f"scoring p0 failed: {describe(exc)}"
            return Snapshot(step, True, seconds=time.perf_counter() - t0, error=error, monitor=self._token)
        seconds = time.perf_counter() - t0
        return Snapshot(step, True, rollouts, **fields, seconds=seconds, monitor=self._token, notes=tuple(notes))

    def _score_p0(self, rollouts: Rollouts, old: torch.Tensor | None) -> dict:
        """S0 (and entropy sums) from the checked ``old_logp`` [N, C] or from a p0 forward (see
        ``rao_blackwell``)."""
        mode = self.config.rao_blackwell
        if old is not None and mode != "always":
            return {"log_p0": row_sums(old), "reused_old_logp": True}
        with preserved(self.model):
            scores = self._engine.score(self.model, rollouts, passes=2)
        gap = None
        if old is not None:
            mask = scores.mask.to(old.device)
            gap = float((old - scores.token_logp.to(old.device)).abs()[mask].max()) if mask.any() else 0.0
        ent = None if mode == "never" else scores.entropy_sum.detach().cpu().numpy()
        fields = {"log_p0": scores.logp.detach().cpu().numpy(), "entropy_sum0": ent, "old_logp_gap": gap}
        if ent is not None and self.config.per_decision != "off":
            fields.update(
                token_logp0=scores.token_logp.detach().float().cpu().numpy(),  # [N, C]
                token_entropy0=scores.token_entropy.detach().float().cpu().numpy(),
            )
        return fields

    # ------------------------------------------------------------------ p1
    def skip(self, reason: str) -> MonitorResult | None:
        """Count a step that cannot be measured: an invalid result if it was due, else None."""
        step = self._n_steps
        self._n_steps += 1
        return None if step % self.config.every else MonitorResult(step, False, str(reason))

    def after(self, snapshots: Snapshot | Sequence[Snapshot]) -> MonitorResult | None:
        """Score the snapshots' rows under p1 (the model now) and estimate ΔH.

        Parameters
        ----------
        snapshots : Snapshot or sequence of Snapshot
            Every micro-batch snapshotted since the previous ``after`` (one optimizer step).

        Returns
        -------
        MonitorResult or None
            None when ``every`` skips this step.
        """
        step = self._n_steps
        try:
            snaps = snapshot_list(snapshots)
        except TypeError as exc:  # a programming error in the loop: named, and the step is counted
            if self.config.strict:
                raise
            self._n_steps += 1
            self._report((str(exc), None), step)
            return MonitorResult(step, False, str(exc))
        if not snaps:
            return self.skip("no micro-batch was snapshotted in this step")
        self._n_steps += 1
        if not any(s.measured for s in snaps):
            return None
        t0 = time.perf_counter()
        rows, failure = self._p1_rows(snaps, step)
        rows, failure = self._exchange(rows, failure)
        judged = judge_rows(rows, self.config, failure=failure, support_size=self._support_size())
        notes = list(dict.fromkeys(n for s in snaps for n in s.notes))  # what the input checks did
        gaps = [s.old_logp_gap for s in snaps if s.old_logp_gap is not None]
        gap = max(gaps) if gaps else None
        if gap is not None and gap > OLD_LOGP_GAP_WARN:
            judged.notes.append(
                f"old_logp differs from the engine's log p0 by up to {gap:.3g} nats: the "
                "trainer scores (or samples) with a different transform or dtype."
            )
        seconds = time.perf_counter() - t0 + sum(s.seconds for s in snaps)
        result = judged.result(step, notes=notes, seconds=seconds, gap=gap)
        failure = judged.failure
        self._report(failure, step, result.valid_tok)
        return result

    def _support_size(self) -> int | None:
        """Tokens a next-token distribution can spread over: the vocabulary, or top-k."""
        V, k = self._inputs.vocab_size, self.config.engine.top_k
        if V is None:
            return None
        return min(V, k) if k else V

    def _p1_rows(self, snaps: list[Snapshot], step: int) -> tuple[dict | None, tuple | None]:
        """This rank's rows of all snapshots, or (None, (reason, exception))."""
        for s in snaps:
            if s.monitor is not None and s.monitor != self._token:
                return None, (
                    "a snapshot was taken by another EntropyMonitor (another model?): pass each its own",
                    None,
                )
            if s.step != step:
                reason = (
                    f"a snapshot was taken at step {s.step} but the monitor is at step {step}: "
                    "call after() once per step with that step's snapshots."
                )
                return None, (reason, None)
            if s.error is not None:
                return None, (s.error, None)
        parts = []
        try:
            with preserved(self.model):
                for s in snaps:
                    sc = self._engine.score(self.model, s.rollouts, passes=1)  # 2 if p0 was scored: pinned then
                    parts.append(rows_of(s, sc))
        except Exception as exc:
            free_memory(exc)
            return None, (f"scoring p1 failed: {describe(exc)}", exc)
        return merge(parts), None

    def _exchange(self, rows, failure):
        """Gather rows (and failures) of all ranks; a failure anywhere fails every rank."""
        if self.config.distributed == "local" or world_size() == 1:
            return rows, failure
        try:
            parts = all_gather({"rows": rows, "error": None if failure is None else failure[0]})
        except Exception as exc:
            return None, (f"gathering rows over ranks failed: {describe(exc)}", exc)
        errors = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"] is not None]
        if errors:
            return None, (failure if failure is not None else ("; ".join(errors), None))
        return merge([p["rows"] for p in parts]), None

    def _report(self, failure, step: int, valid_tok: bool = False) -> None:
        """strict: raise (unless the per-token level holds); else warn once per kind of failure."""
        if failure is None:
            return
        reason, exc = failure
        if self.config.strict and not valid_tok:
            if exc is not None:
                raise exc
            raise MonitorError(f"EntropyMonitor step {step}: {reason}")
        kind = type(exc).__name__ if exc is not None else reason.split(":")[0][:60]
        self._warn_once(
            kind,
            f"EntropyMonitor step {step}: {reason} The training run goes on; this "
            "step's result has valid=False (further failures of this kind are not "
            "warned about; pass strict=True to raise).",
            stacklevel=4,
        )

    def _warn_once(self, kind: str, message: str, stacklevel: int = 4) -> None:
        """A MonitorWarning the first time ``kind`` happens (the caller's caller is the training loop)."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, MonitorWarning, stacklevel=stacklevel)
