"""What the monitor is handed, checked by the batch audit's own checks before any forward.

Every micro-batch's completion mask and prompt padding are checked against DESIGN.md §2–§3 by
:func:`isdelta.engine.audit.check_batch` (O(N·T) tensor operations, no forward), and the first
``old_logp`` the monitor would reuse is checked against the model once (one forward per row):

- a mask that leaves out rows' first stop tokens, and nothing else, is **corrected** when the
  correction is sure: the real lengths are given (``batch["completion_lengths"]``), or they are
  inferred and no row of the batch counts its stop (the signature of ``completion_ids != pad_id``
  with pad == eos). The result's warnings say so, and a ``MonitorWarning`` is issued once;
- any other finding **refuses** the micro-batch (``valid=False`` with the finding, its rows and
  the fix): a right-padded or empty prompt, tokens counted after the first stop, sampled tokens
  left out, a row masked out entirely, or a batch where some rows count their stop and others do
  not (a completion cut by a stop string, padded with pad == eos, looks like a dropped EOS: the
  lengths decide it). Negative ids, ids or stop ids outside the model's vocabulary and tensors of
  the wrong shape or dtype refuse it too, with the argument named;
- ``old_logp`` that disagrees with the model (a column off, another temperature or transform) is
  set aside and p0 rescored, for this step and every later one; so is ``old_logp`` on a corrected
  mask (the trainer's log-probs of the added stop tokens are suspect).

A :class:`Rollouts` is checked with its own real lengths (its attention mask, the sampler's when
isdelta built it from token lists). ``Rollouts.from_tensors`` takes those lengths from the mask it
is handed, so a trainer's tensors are best passed as the mapping, where the mask itself is checked.
``strict=True`` raises where this module would correct or refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from isdelta.engine.audit import LOGP_KINDS, AuditOptions, BatchCheck, Kind, check_batch
from isdelta.engine.audit_checks import check_token_ids
from isdelta.engine.audit_report import spans
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.split import SplitLM
from isdelta.training.model_state import default_eos, default_pad, free_memory, preserved
from isdelta.training.options import MonitorConfig, token_ids
from isdelta.training.rows import Snapshot, old_logp_tensor, old_logp_tokens, prompt_keys
from isdelta.training.verdict import describe

__all__ = ["BATCH_KEYS", "OLD_LOGP_GAP_WARN", "InputChecks", "snapshot_list"]

# the tensors a trainer holds for one micro-batch (TRL GRPO's names)
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
OLD_LOGP_GAP_WARN = 1e-2  # nats; fp32 engines agree to ~1e-5, bf16 ones to a few 1e-3

Warn = Callable[..., None]  # the monitor's warn-once: (kind, message, stacklevel=...)


class InputChecks:
    """The monitor's input checks (module doc) and what they remember: the stop and pad ids, whether
    ``old_logp`` was checked against the model, and why it is no longer reused."""

    def __init__(self, model: torch.nn.Module, config: MonitorConfig, warn: Warn) -> None:
        self.model, self.config, self._warn = model, config, warn
        self.vocab_size = _vocab_size(model)
        self.eos_token_ids, self.pad_token_id = self._stop_and_pad_ids()
        c = config.engine
        # old_logp is checked against the engine's own transform, to the bf16 agreement of OLD_LOGP_GAP_WARN
        self._audit_options = AuditOptions(
            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, logp_tol=OLD_LOGP_GAP_WARN
        )
        self._old_logp_checked = False  # the first old_logp to reuse is checked against the model, once
        self._old_logp_refused: str | None = None  # why old_logp is never reused (p0 rescored instead)

    def _stop_and_pad_ids(self) -> tuple[tuple[int, ...] | None, int | None]:
        """Stop ids (the option, else the model's) and pad id, each inside the model's vocabulary."""
        c, vocab = self.config, None if self.vocab_size is None else (self.vocab_size, "model's vocabulary")
        eos, pad = c.eos_token_ids, c.pad_token_id
        eos_name = "eos_token_ids" if eos is not None else "the model's generation_config.eos_token_id"
        eos = eos if eos is not None else default_eos(self.model)
        eos = None if eos is None else token_ids(eos, eos_name)
        pad = pad if pad is not None else default_pad(self.model)
        check_token_ids(eos_name, eos or (), vocab)
        check_token_ids("pad_token_id", () if pad is None else (pad,), vocab)
        return eos, pad

    def check(self, batch, old_logp, step: int) -> tuple[Rollouts, torch.Tensor | None, list[str]]:
        """The batch in the isdelta layout after the input checks (module doc), with the caller's
        ``old_logp`` [N, C] (float64, 0 off the counted tokens), or None where it is not to be used."""
        tensors, eos, lengths = self._tensors(batch)
        check = check_batch(
            *tensors,
            eos_token_ids=eos,
            pad_token_id=self.pad_token_id,
            completion_lengths=lengths,
            vocab_size=self.vocab_size,
        )
        found, notes = check.input_findings, []
        if found:
            if self.config.strict or check.mask is None:
                raise ValueError(_refusal(found, check, self.config.strict))
            notes.append(check.correction)
            self._warn(
                "corrected mask",
                f"EntropyMonitor step {step}: {check.correction} The step is measured on the corrected mask. Fix "
                "the trainer's mask too: its loss leaves the same tokens out. (Further corrections are not warned "
                "about; they are in each result's warnings; strict=True raises instead.)",
            )
        rollouts = self._layout(batch, tensors, eos, check.mask)
        if old_logp is None:
            return rollouts, None, notes
        old = old_logp_tensor(old_logp, *rollouts.completion_ids.shape)
        why = self._old_logp_refused
        if check.mask is not None:
            why = "the completion mask was corrected, so the trainer's log-probs of the added stop tokens are suspect"
        elif why is None and self.config.rao_blackwell != "always" and not self._old_logp_checked:
            why = self._check_old_logp(tensors, eos, lengths, old, step)
        if why is not None:
            notes.append(f"old_logp not reused (p0 rescored): {why}")
            return rollouts, None, notes
        return rollouts, old_logp_tokens(old, rollouts, self.config.engine), notes

    def _tensors(self, batch) -> tuple[tuple, tuple[int, ...], Any]:
        """``(prompt_ids, prompt_mask, completion_ids, completion_mask)``, the stop ids and the real completion
        lengths (None: inferred by the check) of a Rollouts or a trainer's mapping.

        A Rollouts carries its real lengths, its attention mask (the sampler's, when isdelta built it from
        token lists): they are the check's, as ``batch["completion_lengths"]`` would be.
        """
        if isinstance(batch, Rollouts):
            P = batch.prompt_len
            blocks = (batch.prompt_ids, batch.attention_mask[:, :P], batch.completion_ids, batch.completion_mask)
            return blocks, batch.eos_token_ids, batch.completion_lengths
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"batch: expected an isdelta Rollouts or a mapping with keys "
                f"{list(BATCH_KEYS)}; got {type(batch).__name__}."
            )
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"batch: missing keys {missing}; expected {list(BATCH_KEYS)} (left-padded "
                f"prompts, right-padded completions); got keys {sorted(map(str, batch))}."
            )
        eos = batch.get("eos_token_ids")
        eos = self.eos_token_ids if eos is None else token_ids(eos, "batch['eos_token_ids']")
        if eos is None:
            raise ValueError(
                "eos_token_ids: the model has no eos_token_id; pass "
                "EntropyMonitor(..., eos_token_ids=…) or batch['eos_token_ids']."
            )
        return tuple(batch[k] for k in BATCH_KEYS), eos, batch.get("completion_lengths")

    def _layout(self, batch, tensors: tuple, eos: tuple[int, ...], mask: torch.Tensor | None) -> Rollouts:
        """The checked batch as Rollouts (with ``mask`` when the check corrected it), groups keyed as
        ``group_by`` says."""
        by_prompt = self.config.group_by == "prompt"
        if isinstance(batch, Rollouts) and mask is None:
            if not by_prompt:
                return batch
            keys = prompt_keys(batch.prompt_ids, batch.prompt_lengths)
            return replace(batch, group=keys.to(batch.group.device))
        prompt_ids, prompt_mask, completion_ids, completion_mask = tensors
        pm = torch.as_tensor(prompt_mask)
        given = {"group": batch.group} if isinstance(batch, Rollouts) else batch
        group = prompt_keys(prompt_ids, pm.sum(-1)) if by_prompt else given.get("group")
        return Rollouts.from_tensors(
            prompt_ids,
            pm,
            completion_ids,
            completion_mask if mask is None else mask,
            eos_token_ids=eos,
            group=group,
            num_generations=None if by_prompt else given.get("num_generations"),
        )

    def _check_old_logp(self, tensors, eos, lengths, old: torch.Tensor, step: int) -> str | None:
        """The batch audit's log-prob checks with the model (the logits column, the transform), on the first
        ``old_logp`` to be reused: why it must not be (from now on), or None."""
        self._old_logp_checked = True
        try:
            with preserved(self.model):
                check = check_batch(
                    *tensors,
                    eos_token_ids=eos,
                    pad_token_id=self.pad_token_id,
                    completion_lengths=lengths,
                    per_token_logps=old,
                    model=self.model,
                    options=self._audit_options,
                )
        except Exception as exc:
            free_memory(exc)
            why = f"it could not be checked against the model ({describe(exc)})"
        else:
            bad = [f for f in check.report.findings if f.kind in LOGP_KINDS]
            if not bad:
                return None
            why = f"{bad[0].kind} (rows {spans(bad[0].rows)}): {bad[0].detail} Fix: {bad[0].fix}"
        if self.config.strict:
            raise ValueError(f"old_logp: {why}")
        self._old_logp_refused = why
        self._warn(
            "old_logp refused",
            f"EntropyMonitor step {step}: old_logp is not reused from now on, p0 is rescored (one more forward "
            f"per step): {why}",
            stacklevel=5,
        )
        return why


def _vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's LM head, or None for a model the engine cannot split (it fails at scoring)."""
    try:
        return SplitLM.of(model).vocab_size
    except TypeError:
        return None


def _refusal(found: tuple, check: BatchCheck, strict: bool) -> str:
    """Why a micro-batch is not measured: the audit's findings, the first one's evidence and fix."""
    f = found[0]
    arg = "prompt_mask" if f.kind in (Kind.RIGHT_PADDED_PROMPT, Kind.EMPTY_PROMPT) else "completion_mask"
    kinds = "; ".join(f"{g.kind} (rows {spans(g.rows)})" for g in found)
    text = f"{arg}: the batch breaks the rollout conventions (DESIGN.md §2–§3): {kinds}. {f.detail} Fix: {f.fix}"
    if strict and check.mask is not None:
        return text + f" (strict=True: otherwise the monitor would go on with the mask corrected: {check.correction})"
    return text + " The step is not measured: no valid ΔH comes from a batch the audit rejects."


def snapshot_list(snapshots) -> list[Snapshot]:
    """``after``'s argument as a list of Snapshots; a TypeError that names what arrived otherwise."""
    if isinstance(snapshots, Snapshot):
        return [snapshots]
    if isinstance(snapshots, Sequence) and not isinstance(snapshots, (str, bytes)):
        for i, s in enumerate(snapshots):
            if not isinstance(s, Snapshot):
                raise TypeError(
                    f"snapshots[{i}]: expected a Snapshot (what before() returns); got {_what(s)}. Pass the list "
                    "of this step's before() results."
                )
        return list(snapshots)
    raise TypeError(
        f"snapshots: expected the Snapshot that before() returned, or a list of this step's Snapshots; got "
        f"{_what(snapshots)}. Call snap = monitor.before(batch) before the optimizer step, then monitor.after(snap)."
    )


def _what(x) -> str:
    """What arrived, for an error message."""
    if isinstance(x, Mapping):
        return f"a {type(x).__name__} with keys {sorted(map(str, x))[:6]} (a batch? pass it to before())"
    if isinstance(x, (Rollouts, torch.Tensor)):
        return f"a {type(x).__name__} (a batch? pass it to before())"
    return "None" if x is None else f"a {type(x).__name__}"
