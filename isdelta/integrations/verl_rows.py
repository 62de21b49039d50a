"""ΔH from the per-token arrays verl already computes: the framework-free half of the verl adapter.

verl's old-log-prob pass scores the step's rollouts under the actor before the update (p0): for
every response token the log-prob of the sampled token and the entropy of the full next-token
distribution, both at the rollout temperature. :class:`VerlMonitor` keeps those arrays
(:meth:`~VerlMonitor.before`), takes the same two arrays from one more pass after the update
(:meth:`~VerlMonitor.after`, p1), and estimates ΔH with the monitor's estimators and headline policy
(:func:`isdelta.training.verdict.judge_rows`): the numbers are those of ``estimate`` /
``estimate_tokens`` / ``headline`` on the same arrays. Nothing here imports verl; the arrays are
torch tensors or numpy arrays, [N, R] over response columns (verl's ``response_mask`` layout:
right-padded, the stop token counted), with one ``uid`` per row naming its prompt.

When the rollout engine's own log-probs are given (``rollout_log_probs``, verl's
``rollout.calculate_log_probs=True``), they are the proposal q: vLLM or SGLang sample from q, and
H0 is weighted by p0/q, H1 by p1/q (DESIGN.md §5). The result notes the sampler gap
(mean / max |log q − log p0| per token, :func:`isdelta.estimators.sampler_gap`); verl's
``training/rollout_probs_diff_*`` is the same comparison in probability space,
|q(x_t) − p0(x_t)|, which hides gaps on unlikely tokens (a token at q = 1e-4 and p0 = 2e-4 differs
by 1e-4 in probability and by 0.69 nats in log).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import numpy as np
import torch

from isdelta.estimators import sampler_gap
from isdelta.training.options import MonitorConfig
from isdelta.training.verdict import MonitorError, MonitorResult, MonitorWarning, describe, judge_rows

__all__ = ["VerlMonitor", "rows_from_arrays"]

# a per-token log-prob above this is not a log-probability (bf16 rounding stays far below)
LOGP_SLACK = 1e-3


def _array(x, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float64 numpy copy of a tensor / array, with its shape checked against ``shape``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or (shape is not None and a.shape != shape):
        want = "[N, R]" if shape is None else f"{list(shape)}"
        raise ValueError(f"{name}: expected per-token values {want} aligned with response_mask; got {list(a.shape)}.")
    return a


def rows_from_arrays(
    log_p0, entropy0, log_p1, entropy1, response_mask, uid, *, rollout_log_probs=None, responses=None, eos_token_ids=()
) -> dict:
    """The monitor's row dict (:mod:`isdelta.training.rows`) from verl's per-token arrays.

    Parameters
    ----------
    log_p0, entropy0 : [N, R]
        p0's log-prob of each response token and entropy of its next-token distribution (verl's
        ``old_log_probs`` and ``entropys`` / ``entropy``).
    log_p1, entropy1 : [N, R]
        The same under p1 (the actor after the update).
    response_mask : [N, R] of 0/1
        Counted response tokens: each row's first tokens, the stop token included (verl's
        ``response_mask``). A row with holes (multi-turn or tool rollouts: tokens written by a tool
        are not samples of the model) or with no token is refused.
    uid : sequence [N]
        The prompt of each row (verl's ``uid``: one per prompt, shared by its ``rollout.n``
        responses). Any hashable values.
    rollout_log_probs : [N, R], optional
        The rollout engine's log-prob of each sampled token (the proposal q).
    responses : [N, R] of int, optional
        The response token ids, with ``eos_token_ids`` to mark rows that stopped (else unknown).

    Raises
    ------
    ValueError
        Shapes that disagree, a mask that is not a per-row prefix, non-finite or positive log-probs
        or negative entropies on counted tokens.
    """
    m = _array(response_mask, "response_mask")
    shape = m.shape
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("response_mask: expected 0/1 per response token (verl's response_mask).")
    mask = m.astype(bool)
    length = mask.sum(1)
    prefix = np.arange(shape[1])[None, :] < length[:, None]
    if (mask != prefix).any() or (length == 0).any():
        bad = np.flatnonzero((mask != prefix).any(1) | (length == 0))[:8].tolist()
        raise ValueError(
            f"response_mask: rows {bad} are not one run of counted tokens from the first response "
            "column (holes: multi-turn or tool rollouts, whose tool tokens are not samples of the "
            "model; or empty rows). ΔH is defined on single-turn rollouts sampled from the policy."
        )
    fields = {"token_logp0": log_p0, "token_entropy0": entropy0, "token_logp1": log_p1, "token_entropy1": entropy1}
    if rollout_log_probs is not None:
        fields["token_logq"] = rollout_log_probs
    rows: dict = {}
    for name, x in fields.items():
        a = _array(x, name, shape)
        counted = a[mask]
        if not np.isfinite(counted).all():
            raise ValueError(f"{name}: non-finite values on counted tokens (a NaN or overflowing forward).")
        is_logp = not name.startswith("token_entropy")  # token_logp0, token_logp1, token_logq
        if is_logp and counted.max(initial=-np.inf) > LOGP_SLACK:
            raise ValueError(f"{name}: expected log-probabilities (≤ 0); got {counted.max():.4g}.")
        if not is_logp and counted.min(initial=np.inf) < -LOGP_SLACK:
            raise ValueError(f"{name}: expected entropies (≥ 0); got {counted.min():.4g}.")
        # rounding can put a log-prob a hair above 0 (an entropy below): clamped, as the engine's are
        rows[name] = np.where(mask, np.minimum(a, 0.0) if is_logp else np.maximum(a, 0.0), 0.0)
    uid = np.asarray(list(uid), dtype=object)
    if uid.shape != (shape[0],):
        raise ValueError(f"uid: expected one prompt id per row ({shape[0]}); got {uid.shape[0]}.")
    _, group = np.unique(uid.astype(str), return_inverse=True)
    stopped = None
    if responses is not None and len(eos_token_ids):
        ids = np.asarray(responses.detach().cpu() if isinstance(responses, torch.Tensor) else responses)
        stopped = np.isin(ids[np.arange(shape[0]), length - 1], list(eos_token_ids))
    rows.update(
        mask=mask,
        log_p0=rows["token_logp0"].sum(1),
        log_p1=rows["token_logp1"].sum(1),
        entropy_sum0=rows["token_entropy0"].sum(1),
        entropy_sum1=rows["token_entropy1"].sum(1),
        length=length.astype(np.int64),
        group=group.reshape(-1).astype(np.int64),
        stopped=stopped,
    )
    return rows


class VerlMonitor:
    """ΔH of each monitored step from verl's arrays (p0 from its old-log-prob pass, p1 from one more).

    ``mon.before(old_log_probs, entropys, response_mask, uid)`` after verl's old-log-prob pass;
    ``result = mon.after(log_probs, entropys)`` after one more pass on the updated actor;
    ``result.scalars()`` into verl's metrics. Steps are counted by ``after`` / ``skip`` calls;
    ``due()`` says whether this one is measured (``every``).

    Parameters
    ----------
    every : int
        Measure every k-th step (the others cost nothing).
    support_size : int, optional
        Tokens a next-token distribution can spread over (the vocabulary): bounds H per token.
    eos_token_ids : sequence of int
        Stop ids (mark rows that stopped; optional).
    **options
        ``weights``, ``clip``, ``level``, ``prompts``, ``per_decision``, ``strict`` of
        :class:`isdelta.training.MonitorConfig`. Failures give ``valid=False`` with the reason
        (warned once per kind); ``strict=True`` raises them instead.
    """

    OPTIONS = ("weights", "clip", "level", "prompts", "per_decision", "strict")

    def __init__(self, *, every: int = 1, support_size: int | None = None, eos_token_ids=(), **options) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"VerlMonitor got unknown option(s) {unknown}; valid: every, support_size, {self.OPTIONS}.")
        self.config = replace(MonitorConfig(every=every), **options)
        self.support_size = support_size
        self.eos_token_ids = tuple(int(i) for i in (eos_token_ids or ()))
        self.results: list[MonitorResult] = []
        self._p0: dict | None = None
        self._n_steps = 0
        self._warned: set[str] = set()

    @property
    def n_steps(self) -> int:
        return self._n_steps

    def due(self) -> bool:
        """Whether the current step is measured (``every``)."""
        return self._n_steps % self.config.every == 0

    def before(
        self, log_probs, entropy, response_mask, uid, *, rollout_log_probs=None, responses=None, notes=(), seconds=0.0
    ) -> None:
        """Keep p0's arrays of this step (copies on the CPU; nothing is checked until :meth:`after`)."""
        if not self.due():
            return

        def cpu(x):
            return x.detach().cpu().clone() if isinstance(x, torch.Tensor) else (None if x is None else np.array(x))

        self._p0 = {
            "log_p0": cpu(log_probs),
            "entropy0": cpu(entropy),
            "response_mask": cpu(response_mask),
            "uid": list(uid),
            "rollout_log_probs": cpu(rollout_log_probs),
            "responses": cpu(responses),
            "notes": tuple(notes),
            "seconds": float(seconds),
        }

    @property
    def pending(self) -> bool:
        """p0 of the current step is kept (``before`` ran since the last ``after``)."""
        return self._p0 is not None

    def skip(self, reason: str, step: int | None = None) -> MonitorResult | None:
        """Count a step that cannot be measured: an invalid result if it was due, else None."""
        due, k = self.due(), self._n_steps
        self._n_steps += 1
        self._p0 = None
        if not due:
            return None
        result = MonitorResult(k if step is None else step, False, str(reason))
        self._report(result, None)
        self.results.append(result)
        return result

    def after(self, log_probs, entropy, *, step: int | None = None, seconds: float = 0.0) -> MonitorResult | None:
        """Estimate ΔH from p0's kept arrays and p1's (``log_probs``, ``entropy`` [N, R]).

        ``step`` is what the result reports (verl's ``global_steps``); ``seconds`` the cost of the
        p1 pass, added to the result's. Never raises unless ``strict``.
        """
        if not self.due():
            self._n_steps += 1
            return None
        p0, self._p0 = self._p0, None
        if p0 is None:
            return self.skip("no p0 arrays were kept for this step (verl's old-log-prob pass did not run)", step)
        t0 = time.perf_counter()
        k = self._n_steps if step is None else step
        self._n_steps += 1
        failure, rows, notes = None, None, list(p0["notes"])
        try:
            rows = rows_from_arrays(
                p0["log_p0"],
                p0["entropy0"],
                log_probs,
                entropy,
                p0["response_mask"],
                p0["uid"],
                rollout_log_probs=p0["rollout_log_probs"],
                responses=p0["responses"],
                eos_token_ids=self.eos_token_ids,
            )
        except Exception as exc:
            failure = (
                str(exc) if isinstance(exc, ValueError) else f"reading verl's arrays failed: {describe(exc)}",
                exc,
            )
        if rows is not None and rows.get("token_logq") is not None:
            notes.append(self._gap_note(rows))
        judged = judge_rows(rows, self.config, failure=failure, support_size=self.support_size)
        result = judged.result(k, notes=notes, seconds=time.perf_counter() - t0 + seconds + p0["seconds"])
        self._report(result, judged.failure[1] if judged.failure else None)
        self.results.append(result)
        return result

    @staticmethod
    def _gap_note(rows: dict) -> str:
        try:
            g = sampler_gap(rows["token_logq"], rows["token_logp0"], rows["mask"], rows["group"])
        except ValueError as exc:
            return f"sampler gap not computed: {exc}"
        return (
            f"sampler gap |log q − log p0| per token: mean {g.mean_abs:.3g}, max {g.max_abs:.3g} nats, "
            f"{g.frac_over:.1%} of tokens over {g.tol:g} (q: the rollout engine's log-probs)"
        )

    def _report(self, result: MonitorResult, exc: BaseException | None) -> None:
        """strict: raise (unless the per-token level holds); else warn once per kind of failure."""
        if result.valid or result.reason is None:
            return
        if self.config.strict and not result.valid_tok:
            if exc is not None:
                raise exc
            raise MonitorError(f"isdelta (verl) step {result.step}: {result.reason}")
        kind = type(exc).__name__ if exc is not None else result.reason.split(":")[0][:60]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"isdelta (verl) step {result.step}: {result.reason} Training goes on; this step logs "
                "entropy/valid = 0 (further failures of this kind are not warned about).",
                MonitorWarning,
                stacklevel=3,
            )
