"""ΔH of every verl PPO / GRPO step, in verl's own metrics (checked against verl 0.9.1).

verl's default trainer (``trainer.use_v1=true``) picks its class by ``trainer.v1.trainer_mode``;
importing this module registers ``isdelta``: verl's synchronous trainer plus the monitor. Two
changes to an existing run::

    VERL_USE_EXTERNAL_MODULES=isdelta.integrations.verl \\
    python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=isdelta [+isdelta.every=1]

(``VERL_USE_EXTERNAL_MODULES`` is verl's own plugin hook: every verl process imports the module,
so the Ray task runner that builds the trainer finds the mode.) With the legacy trainer
(``trainer.use_v1=false``) or a recipe that builds ``RayPPOTrainer`` itself, put the mixin first:
``class Trainer(EntropyDeltaMixin, RayPPOTrainer): pass``.

How it hooks in, per monitored step::

    _compute_old_log_prob   verl's pass on the actor: log p0 and H0 per response token
                            [kept] the arrays (the rows' uid, response_mask, rollout_log_probs)
    _update_actor           verl's PPO / GRPO update: p0 → p1
                            [added] the same pass on the updated actor: log p1 and H1 per token
                            ΔH estimated on the driver; entropy/… added to the step's metrics

So p0 costs nothing (verl's pass computes the entropies and used to drop them) and p1 costs one
forward of the batch on the actor workers, in their own sharding and micro-batches; only [N, R]
per-token arrays reach the driver, as verl's own pass sends them. Logged beside verl's
``actor/entropy`` (the mean token entropy of the rollouts under p0, aggregated by its
``loss_agg_mode``): ``entropy/delta`` (ΔH per response, nats) with ``entropy/delta_ci_low`` /
``_ci_high``, ``entropy/delta_tok`` (per token), ``entropy/h0_tok`` / ``h1_tok``,
``entropy/valid`` / ``valid_tok`` and ``entropy/method`` (:meth:`MonitorResult.scalars`). A step that
cannot be measured logs ``entropy/valid = 0`` with NaN estimates and warns once with the reason;
nothing raises into the training loop (``+isdelta.strict=true`` raises, for debugging).

The proposal: with ``rollout.calculate_log_probs=True`` (verl's default) the rollout engine's
log-probs (vLLM, SGLang) are q, and the estimators weight H0 by p0/q and H1 by p1/q; the
result's warnings give the sampler gap. Without them q = p0 is assumed. Refused (``valid = 0``,
with the reason): a sampler that truncates (``rollout.top_p < 1`` or ``top_k > 0``: verl's
log-probs score the untruncated policy), multi-turn / tool rollouts (a ``response_mask`` with holes),
and local updates after the first of a step (``parameter_sync_step > 1``) without q, whose
rollouts came from an older actor.

Options, from the run's config (``+isdelta.<name>=…``) or the class attribute
``isdelta_options``: ``every``, ``weights``, ``clip``, ``level``, ``prompts``, ``per_decision``,
``strict`` (:class:`isdelta.integrations.verl_rows.VerlMonitor`).
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from isdelta.integrations.verl_rows import VerlMonitor, rows_from_arrays
from isdelta.training.verdict import MonitorResult, describe

__all__ = ["EntropyDeltaMixin", "EntropyDeltaV1Mixin", "VerlMonitor", "register", "rows_from_arrays"]

MODE = "isdelta"


class _Monitored:
    """What both trainers share: the monitor made from the run's config, the sampler check, logging."""

    isdelta_options: ClassVar[dict] = {}  # read, never mutated: set your own on a subclass

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        VerlMonitor(**self._isdelta_opts())  # a bad option raises here, before training, not at a step

    def _isdelta_opts(self) -> dict:
        """``isdelta_options`` updated by the run's ``config.isdelta`` (``+isdelta.every=5``)."""
        opts = dict(self.isdelta_options)
        extra = self.config.get("isdelta", None) if hasattr(self.config, "get") else None
        if extra:
            opts.update({str(k): v for k, v in dict(extra).items()})
        return opts

    def isdelta_monitor(self) -> VerlMonitor:
        """The run's :class:`VerlMonitor` (made at first use, from the options and the tokenizer)."""
        mon = self.__dict__.get("_isdelta_monitor")
        if mon is None:
            tok = getattr(self, "tokenizer", None)
            eos = getattr(tok, "eos_token_id", None)
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            mon = VerlMonitor(support_size=self._isdelta_vocab(tok), eos_token_ids=eos, **self._isdelta_opts())
            self._isdelta_monitor = mon
        return mon

    def _isdelta_vocab(self, tok) -> int | None:
        """The actor's vocabulary (its logits' width: the bound on a per-token entropy), from the model
        config verl loads; else the tokenizer's length; else None (the estimators' 2^32)."""
        model = self.config.actor_rollout_ref.model
        try:
            from transformers import AutoConfig

            remote = bool(model.get("trust_remote_code", False))  # the run's own setting (DESIGN.md §9)
            cfg = AutoConfig.from_pretrained(str(model.path), trust_remote_code=remote)
            size = getattr(cfg, "vocab_size", None) or getattr(cfg.get_text_config(), "vocab_size", None)
            if size:
                return int(size)
        except Exception:
            pass
        return len(tok) if tok is not None and hasattr(tok, "__len__") else None

    def _isdelta_refusal(self) -> str | None:
        """Why this run's rollouts cannot be scored by verl's log-probs (a truncating sampler)."""
        r = self.config.actor_rollout_ref.rollout
        top_p, top_k = float(r.get("top_p", 1.0) or 1.0), int(r.get("top_k", -1) or -1)
        if top_p < 1.0 or top_k > 0:
            return (
                f"rollout top_p={top_p:g}, top_k={top_k}: the sampler truncates the policy, while verl's "
                "log-probs (p0, p1) score it untruncated, so the rows are not samples of p0. Set "
                "actor_rollout_ref.rollout.top_p=1.0 and top_k=-1 to measure ΔH."
            )
        return None

    def _isdelta_step(self) -> int:
        return int(getattr(self, "global_steps", 0) or 0)

    def _isdelta_measure(self, score_p1) -> MonitorResult | None:
        """p1 by ``score_p1() -> (log_probs, entropy)`` and the estimate; never raises unless strict."""
        mon = self.isdelta_monitor()
        if not mon.due():
            return mon.after(None, None)
        if not mon.pending:
            return mon.skip(self._isdelta_missing or "verl's old-log-prob pass did not run", self._isdelta_step())
        t0 = time.perf_counter()
        try:
            log_probs, entropy = score_p1()
        except Exception as exc:
            if mon.config.strict:
                raise
            return mon.skip(f"the p1 pass on the actor failed: {describe(exc)}", self._isdelta_step())
        return mon.after(log_probs, entropy, step=self._isdelta_step(), seconds=time.perf_counter() - t0)

    _isdelta_missing: str | None = None


# ---------------------------------------------------------------------------- legacy: RayPPOTrainer
class EntropyDeltaMixin(_Monitored):
    """For verl's ``RayPPOTrainer`` (``trainer.use_v1=false``) and recipes built on it:
    ``class Trainer(EntropyDeltaMixin, RayPPOTrainer): pass``.

    Keeps p0's arrays from ``_compute_old_log_prob``, scores p1 after ``_update_actor`` with the same
    pass, and adds ``entropy/…`` to the actor's metrics of the step. In verl's bypass mode (old
    log-probs = the rollout's, no old-log-prob pass) p0 is scored before the update: one more
    forward.
    """

    def _compute_old_log_prob(self, batch):
        out = super()._compute_old_log_prob(batch)
        mon = self.isdelta_monitor()
        if mon.due():
            try:
                self._isdelta_keep(batch, out[0].batch["old_log_probs"], out[0].batch["entropys"])
            except Exception as exc:
                self._isdelta_missing = f"keeping p0's arrays failed: {describe(exc)}"
        return out

    def _isdelta_keep(self, batch, log_probs, entropy, notes=()) -> None:
        refusal = self._isdelta_refusal()
        if refusal is not None:
            self._isdelta_missing = refusal
            return
        self._isdelta_missing = None
        b = batch.batch
        uid = batch.non_tensor_batch["uid"]
        q = b.get("rollout_log_probs", None)
        self.isdelta_monitor().before(
            log_probs, entropy, b["response_mask"], uid, rollout_log_probs=q, responses=b["responses"], notes=notes
        )

    def _isdelta_pass(self, batch):
        """log-probs and entropies of ``batch``'s responses under the actor now (verl's own pass)."""
        out, _ = super()._compute_old_log_prob(batch)
        return out.batch["old_log_probs"], out.batch["entropys"]

    def _update_actor(self, batch):
        mon = self.isdelta_monitor()
        if mon.due() and not mon.pending and self._isdelta_missing is None:
            try:  # bypass mode: no old-log-prob pass ran, so score p0 before the update
                t0 = time.perf_counter()
                lp, ent = self._isdelta_pass(batch)
                note = "p0 scored by isdelta before the update (verl's bypass mode skips its old-log-prob pass)"
                self._isdelta_keep(batch, lp, ent, notes=(f"{note}: {time.perf_counter() - t0:.2f} s",))
            except Exception as exc:
                self._isdelta_missing = f"the p0 pass on the actor failed: {describe(exc)}"
        out = super()._update_actor(batch)
        result = self._isdelta_measure(lambda: self._isdelta_pass(batch))
        self._isdelta_missing = None
        if result is not None:
            out.meta_info.setdefault("metrics", {}).update(result.scalars())
        return out


# ---------------------------------------------------------------------------- verl's v1 trainer
def _padded(t, dtype=None):
    """A jagged nested tensor [N, ragged] as a right-padded dense tensor (0 on the right)."""
    if getattr(t, "is_nested", False):
        t = t.to_padded_tensor(0)
    return t if dtype is None else t.to(dtype)


class EntropyDeltaV1Mixin(_Monitored):
    """For verl's v1 ``PPOTrainer`` (TransferQueue batches); registered as the trainer mode
    ``isdelta`` with the synchronous trainer (:func:`register`).

    p0's arrays are fetched from TransferQueue after verl's old-log-prob pass; after the update the
    same pass writes p1's ``log_probs`` / ``entropy`` there, and p0's ``entropy`` is put back (its
    ``log_probs`` field, which verl has already copied to ``old_log_probs``, keeps p1's). Rows
    verl adds to fill a mini-batch (``is_padding``) are left out. In bypass mode p0 is scored
    before the update, as in :class:`EntropyDeltaMixin`.
    """

    P0_FIELDS = ("old_log_probs", "entropy", "response_mask", "responses", "uid")

    def _compute_old_log_prob(self, batch, metrics):
        batch = super()._compute_old_log_prob(batch, metrics)
        mon = self.isdelta_monitor()
        if mon.due():
            try:
                self._isdelta_keep(batch)
            except Exception as exc:
                self._isdelta_missing = f"keeping p0's arrays failed: {describe(exc)}"
        return batch

    def _isdelta_rows(self, batch) -> np.ndarray:
        """Indices of the batch's real rows (verl pads a batch to a multiple of the DP size)."""
        return np.array([i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)], dtype=np.int64)

    def _isdelta_keep(self, batch) -> None:
        import transfer_queue as tq

        refusal = self._isdelta_refusal()
        if refusal is None and getattr(self, "local_trigger_step", 0) and not self._isdelta_has_q():
            refusal = (
                "the rollouts of this local update were generated before the step's first update "
                "(parameter_sync_step > 1), so they are not samples of p0; set "
                "actor_rollout_ref.rollout.calculate_log_probs=True to weight them by the rollout's q."
            )
        if refusal is not None:
            self._isdelta_missing = refusal
            return
        self._isdelta_missing = None
        keep, notes = self._isdelta_rows(batch), ()
        rc = self.config.algorithm.get("rollout_correction", None)
        bypass = bool(rc and rc.get("bypass_mode", False))
        if bypass:  # verl's bypass mode skips its old-log-prob pass: score p0 before the update
            t0 = time.perf_counter()
            lp0, h0 = self._isdelta_pass(batch)
            note = "p0 scored by isdelta before the update (verl's bypass mode skips its old-log-prob pass)"
            notes = (f"{note}: {time.perf_counter() - t0:.2f} s",)
        fields = [f for f in self.P0_FIELDS if not (bypass and f in ("old_log_probs", "entropy"))]
        fields += ["rollout_log_probs"] if self._isdelta_has_q() else []
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        uid = [str(u) for u in list(data["uid"])]  # a tensordict LinkedList: no .tolist()
        td = {k: _padded(data[k]) for k in fields if k != "uid"}
        if not bypass:
            self._isdelta_entropy0 = data["entropy"]  # put back after the p1 pass overwrites it
            lp0, h0 = td["old_log_probs"][keep], td["entropy"][keep]
        q = td.get("rollout_log_probs")
        self.isdelta_monitor().before(
            lp0,
            h0,
            td["response_mask"][keep],
            [uid[i] for i in keep],
            rollout_log_probs=None if q is None else q[keep],
            responses=td["responses"][keep],
            notes=notes,
        )

    def _isdelta_has_q(self) -> bool:
        return bool(self.config.actor_rollout_ref.rollout.get("calculate_log_probs", False))

    def _isdelta_pass(self, batch):
        """The actor's log-probs and entropies of ``batch`` now: verl's old-log-prob pass again."""
        import transfer_queue as tq
        from tensordict import TensorDict
        from verl.workers.utils.padding import response_from_nested

        saved = dict(batch.extra_info)
        batch.extra_info.update(
            calculate_entropy=True, compute_loss=False, temperature=self.config.actor_rollout_ref.rollout.temperature
        )
        try:
            self.actor_rollout_wg.compute_log_prob(batch)
        finally:
            batch.extra_info.clear()
            batch.extra_info.update(saved)
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["log_probs", "entropy", "response_mask"]
        )
        mask = data["response_mask"]
        log_probs = _padded(response_from_nested(data["log_probs"], mask))
        entropy = _padded(response_from_nested(data["entropy"], mask))
        entropy0 = self.__dict__.pop("_isdelta_entropy0", None)
        if entropy0 is not None:  # leave the store as verl's own pass left it
            tq.kv_batch_put(
                keys=batch.keys,
                partition_id=batch.partition_id,
                fields=TensorDict({"entropy": entropy0}, batch_size=len(batch)),
            )
        keep = self._isdelta_rows(batch)
        return log_probs[keep], entropy[keep]

    def _update_actor(self, batch, metrics):
        batch = super()._update_actor(batch, metrics)
        result = self._isdelta_measure(lambda: self._isdelta_pass(batch))
        self._isdelta_missing = None
        if result is not None:
            metrics.update(result.scalars())
        return batch


def register(name: str = MODE):
    """Register verl's synchronous v1 trainer with the monitor as ``trainer.v1.trainer_mode=name``
    (done on import when verl is installed); returns the class."""
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

    if name in TRAINER_REGISTRY:
        return TRAINER_REGISTRY[name]
    cls = type("IsdeltaPPOTrainerSync", (EntropyDeltaV1Mixin, PPOTrainerSync), {"__module__": __name__})
    return register_trainer(name)(cls)


try:  # verl present: the trainer mode exists as soon as this module is imported
    import verl.trainer.ppo.v1  # noqa: F401
except ImportError:
    pass
else:
    IsdeltaPPOTrainerSync = register()
