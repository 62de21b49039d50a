"""Audit a trainer's batch against the rollout conventions (DESIGN.md §2–§3) and say what is wrong.

One call on what a trainer holds; one line in a test::

    report = audit_batch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                         tokenizer=tok, position_ids=pos, per_token_logps=logps, model=model)
    print(report)      # a table: kind, rows, columns, nats per sequence; then the why and the fix
    assert_batch_ok(prompt_ids, prompt_mask, completion_ids, completion_mask, tokenizer=tok)

From the tensors alone: the completion mask (EOS dropped when pad == eos, tokens after the first
stop, pads after a completion without a stop, real tokens left out), left padding of prompts,
positions, the values of the log-probs and the loss normalisation. With ``model=``: which logits
column the log-probs came from, and how many nats per sequence wrong positions cost. What each
check needs and what it assumed is in the report's ``notes``. Impossible input (negative ids, ids
or stop ids outside the vocabulary, tensors of the wrong shape or dtype) raises instead.

In a training loop, :func:`check_batch` runs the same checks on every batch (O(N·T) tensor
operations) and returns the corrected mask where the one sure correction applies: first stop tokens
left out by a mask built from ``token != pad_id`` with pad == eos (``EntropyMonitor`` uses it).

Command line: ``python -m isdelta.engine.audit_cli BATCH.pt [--model PATH] [--eos-id ID] ...``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from isdelta.engine.audit_checks import (
    Reference,
    as_tensor,
    build_reference,
    check_completion_mask,
    check_prompt,
    check_token_ids,
    stop_correction,
)
from isdelta.engine.audit_io import batch_arguments, load_batch
from isdelta.engine.audit_logps import (
    check_logits_alignment,
    check_logp_values,
    check_logps,
    logps_from_logits,
    row_references,
)
from isdelta.engine.audit_positions import audit_positions
from isdelta.engine.audit_report import LOGP_KINDS, BatchAuditError, BatchReport, Finding, Kind
from isdelta.engine.audit_weights import check_loss_weights
from isdelta.engine.masking import normalise_eos_ids
from isdelta.engine.split import SplitLM
from isdelta.engine.transform import LogitTransform

__all__ = [
    "LOGP_KINDS",
    "AuditOptions",
    "BatchAuditError",
    "BatchCheck",
    "BatchReport",
    "Finding",
    "Kind",
    "assert_batch_ok",
    "audit_batch",
    "batch_arguments",
    "check_batch",
    "load_batch",
]

MODEL_VOCAB = "model's vocabulary"


@dataclass(frozen=True)
class AuditOptions:
    """Options of :func:`audit_batch`.

    Attributes
    ----------
    include_eos : the convention audited: the first stop token counts (DESIGN.md §3) or not.
    temperature : the temperature the per-token log-probs (or logits) were computed with (TRL:
        ``args.temperature``); the reference divides the logits by it too.
    top_k, top_p : the rest of the sampling transform the log-probs were computed with (default
        off: TRL's log-probs apply the temperature only); the reference applies it too.
    logp_tol : largest per-token |log p − reference| in nats taken as agreement (fp32 rounding on
        the tests' tiny models is ~1e-6; raise it for a bf16 trainer).
    rows_per_forward : rows per padded forward in the positions check with a model.
    """

    include_eos: bool = True
    temperature: float = 1.0
    logp_tol: float = 1e-3
    rows_per_forward: int = 8
    top_k: int | None = None
    top_p: float = 1.0

    @property
    def transform(self) -> LogitTransform:
        return LogitTransform(self.temperature, self.top_k, self.top_p)

    def __post_init__(self) -> None:
        LogitTransform(self.temperature, self.top_k, self.top_p)  # validates them
        if not isinstance(self.include_eos, bool):
            raise TypeError(f"include_eos must be True or False; got {self.include_eos!r}.")
        if not self.logp_tol > 0 or self.rows_per_forward < 1:
            raise ValueError(
                f"logp_tol must be > 0 and rows_per_forward >= 1; got {self.logp_tol}, {self.rows_per_forward}."
            )


def audit_batch(
    prompt_ids,
    prompt_mask,
    completion_ids,
    completion_mask,
    *,
    eos_token_ids: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    completion_lengths=None,
    attention_mask=None,
    position_ids=None,
    per_token_logps=None,
    logits=None,
    loss_weights=None,
    model: torch.nn.Module | None = None,
    options: AuditOptions | None = None,
) -> BatchReport:
    """Audit the tensors a trainer holds; return a report of named findings.

    Parameters
    ----------
    prompt_ids, prompt_mask : Tensor [N, P]
        Prompts (left-padded is the convention) and their 0/1 mask.
    completion_ids, completion_mask : Tensor [N, C]
        Right-padded completions and the 0/1 mask under audit (the tokens the loss counts).
    eos_token_ids : int or iterable of int, optional
        Every id that stops generation (TRL: ``trainer.eos_token_ids``). Default: the tokenizer's
        EOS id and the model's ``generation_config.eos_token_id``.
    pad_token_id : int, optional
        Default: the tokenizer's. Used to name "pad == eos" and to infer real lengths; masks are
        never built from it.
    tokenizer : HF tokenizer, optional
        Source of the stop and pad ids.
    completion_lengths : Tensor [N], optional
        Sampled tokens per row (pads excluded). Without it (or ``attention_mask``) the real
        lengths are inferred and the notes say how.
    attention_mask : Tensor [N, P + C], optional
        The sampler's attention mask: its completion block gives the real lengths, and positions are
        checked against it. Do not pass one built from the mask under audit (TRL's is).
    position_ids : Tensor [N, P + C] or [1, P + C], or ``"implicit"``, optional
        The positions the trainer's forward uses; ``"implicit"`` when it passes none (HF models then
        use ``arange(P + C)``).
    per_token_logps : Tensor [N, C], optional
        The trainer's log-probs of the completion tokens (TRL: ``old_per_token_logps``).
    logits : Tensor [N, C, V], optional
        The logits the trainer scores completion column c with. Without ``model`` their column is
        inferred from which tokens they fit; with it, their log-probs are checked exactly.
    loss_weights : Tensor [N, C], optional
        The weight the loss gives each token (the normaliser only, e.g. ``mask / mask.sum()``).
    model : HF causal LM, optional
        Runs the model checks (log-prob alignment, the nats wrong positions cost).
    options : AuditOptions, optional

    Returns
    -------
    BatchReport
        ``report.ok``, ``str(report)`` (a table), ``report.raise_if_any()``, ``report.to_dict()``.

    Raises
    ------
    ValueError, TypeError
        Tensors of the wrong shape or dtype, negative token ids, no stop ids, or stop, pad or token
        ids outside the vocabulary (the model's with ``model=``, else the tokenizer's for stop and
        pad ids): impossible input, not findings.
    """
    opts = options or AuditOptions()
    eos, pad = _stop_and_pad(eos_token_ids, pad_token_id, tokenizer, model)
    vocab = _vocab_size(model, tokenizer)
    report, _ = _audit(
        (prompt_ids, prompt_mask, completion_ids, completion_mask),
        eos=eos,
        pad=pad,
        vocab=vocab,
        opts=opts,
        completion_lengths=completion_lengths,
        attention_mask=attention_mask,
        position_ids=position_ids,
        per_token_logps=per_token_logps,
        logits=logits,
        loss_weights=loss_weights,
        model=model,
    )
    return report


def _audit(
    tensors,
    *,
    eos,
    pad,
    vocab,
    opts,
    completion_lengths=None,
    attention_mask=None,
    position_ids=None,
    per_token_logps=None,
    logits=None,
    loss_weights=None,
    model=None,
) -> tuple[BatchReport, Reference]:
    """The checks of :func:`audit_batch` on validated stop ids; the report and the reference it used."""
    check_token_ids("eos_token_ids", eos, vocab)
    if pad is not None:
        check_token_ids("pad_token_id", (pad,), vocab)
    ref, notes = build_reference(
        *tensors, eos=eos, pad=pad, include_eos=opts.include_eos, lengths=completion_lengths, attention=attention_mask
    )
    N, C = ref.completion_ids.shape
    # ids only against the model's head: a model may have more rows than its tokenizer has tokens
    top = max(int(ref.prompt_ids.max()), int(ref.completion_ids.max())) if vocab is not None else 0
    if vocab is not None and vocab[1] == MODEL_VOCAB and top >= vocab[0]:
        raise ValueError(
            f"token ids up to {top} but the {vocab[1]} has {vocab[0]}: the batch was "
            "tokenized for another model. Pass the trainer's own model."
        )
    checked = ["completion mask", "prompt padding"]
    findings = check_completion_mask(ref) + check_prompt(ref)
    if position_ids is None:
        notes.append(
            "positions: not checked (pass position_ids=, or position_ids='implicit' if the trainer passes none)."
        )
    else:
        checked.append("positions")
        findings += audit_positions(ref, position_ids, attention_mask, model, opts.rows_per_forward)
    transform = opts.transform
    logps = None if per_token_logps is None else as_tensor("per_token_logps", per_token_logps, 2).float()
    if logits is not None:
        logits = as_tensor("logits", logits, 3)
        if logits.shape[:2] != (N, C):
            raise ValueError(f"logits must be [N, C, V] with [N, C] = [{N}, {C}]; got {tuple(logits.shape)}.")
        logps = logps_from_logits(logits, ref.completion_ids, transform) if logps is None else logps
    if logps is not None:
        if logps.shape != (N, C):
            raise ValueError(f"per_token_logps must be [N, C] = [{N}, {C}]; got {tuple(logps.shape)}.")
        checked.append("log-prob values")
        findings += check_logp_values(ref, logps)
    if logps is not None and model is not None:
        checked.append("log-prob alignment (model)")
        findings += check_logps(ref, logps, row_references(model, ref, transform), opts.logp_tol)
    elif logits is not None:
        checked.append("logits column (logits only)")
        findings += check_logits_alignment(ref, logits, transform)
    else:
        need = "model=" if logps is not None else "per_token_logps= or logits=, and model="
        notes.append(f"log-prob alignment: not checked (needs {need}).")
    if loss_weights is None:
        notes.append("loss normalisation: not checked (pass loss_weights=).")
    else:
        weights = as_tensor("loss_weights", loss_weights, 2)
        if weights.shape != (N, C):
            raise ValueError(f"loss_weights must be [N, C] = [{N}, {C}]; got {tuple(weights.shape)}.")
        checked.append("loss normalisation")
        found, more = check_loss_weights(ref, weights)
        findings, notes = findings + found, notes + more
    return BatchReport(tuple(findings), N, tuple(checked), tuple(notes)), ref


def _vocab_size(model, tokenizer) -> tuple[int, str] | None:
    """(V, whose) from the model's LM head, else the tokenizer's length (added tokens included); or None."""
    if model is not None:
        return SplitLM.of(model).vocab_size, MODEL_VOCAB
    try:
        return len(tokenizer), "tokenizer's vocabulary"
    except TypeError:  # no tokenizer, or one without __len__
        return None


def _stop_and_pad(eos_token_ids, pad_token_id, tokenizer, model) -> tuple[tuple[int, ...], int | None]:
    """The stop ids (given, else the tokenizer's and the model's generation config's) and the pad id."""
    eos = normalise_eos_ids(eos_token_ids)
    if not eos:
        found = [getattr(tokenizer, "eos_token_id", None)]
        found.append(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        eos = normalise_eos_ids([i for x in found if x is not None for i in ([x] if isinstance(x, int) else x)])
    if not eos:
        raise ValueError(
            "no stop ids: the audit needs every id that stops generation. Pass eos_token_ids= (TRL: "
            "trainer.eos_token_ids) or tokenizer=."
        )
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    return eos, None if pad_token_id is None else int(pad_token_id)


def assert_batch_ok(*args, **kwargs) -> BatchReport:
    """:func:`audit_batch`, then raise :class:`BatchAuditError` (an ``AssertionError``) with the
    report's table if anything was found: a user's test is one line. Returns the report."""
    report = audit_batch(*args, **kwargs)
    report.raise_if_any()
    return report


@dataclass(frozen=True)
class BatchCheck:
    """What :func:`check_batch` found, and the completion mask to use.

    Attributes
    ----------
    report : BatchReport
        The findings, as :func:`audit_batch` reports them.
    mask : BoolTensor [N, C] or None
        The reference mask when every mask and prompt finding is a row's first stop token left
        uncounted and the real lengths leave no doubt that it was sampled (the one correction that is
        unambiguous: the mask under audit plus those tokens); None otherwise.
    correction : str or None
        What ``mask`` adds and what it assumed.
    """

    report: BatchReport
    mask: torch.Tensor | None = None
    correction: str | None = None

    @property
    def input_findings(self) -> tuple[Finding, ...]:
        """The findings about the masks and prompts (not the log-probs)."""
        return tuple(f for f in self.report.findings if f.kind not in LOGP_KINDS)


def check_batch(
    prompt_ids,
    prompt_mask,
    completion_ids,
    completion_mask,
    *,
    eos_token_ids: int | Iterable[int],
    pad_token_id: int | None = None,
    completion_lengths=None,
    per_token_logps=None,
    model: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    options: AuditOptions | None = None,
) -> BatchCheck:
    """The audit a training loop can run on every batch, and the corrected mask where the fix is sure.

    The checks of :func:`audit_batch` (the same functions) on what a trainer hands over: the completion
    mask and the prompt padding, the values of ``per_token_logps`` (O(N·(P + C)) tensor operations, no
    forward) and, with ``model=``, the logits column they came from (one forward per row: for a first
    batch). Then :func:`isdelta.engine.audit_checks.stop_correction`: when the only mask findings are
    uncounted first stop tokens (a mask built from ``token != pad_id`` with pad == eos), ``mask`` is the
    mask with them counted.

    Parameters
    ----------
    prompt_ids, prompt_mask, completion_ids, completion_mask, completion_lengths, per_token_logps
        As :func:`audit_batch`.
    eos_token_ids : int or iterable of int
        Every stop id (required).
    pad_token_id : int, optional
        Reads real lengths (see :func:`audit_batch`); never builds a mask.
    model : HF causal LM, optional
        Checks the log-probs' column against the model, and the ids against its vocabulary.
    vocab_size : int, optional
        The model's vocabulary without a model: ids and stop ids must lie below it.
    options : AuditOptions, optional

    Returns
    -------
    BatchCheck

    Raises
    ------
    ValueError, TypeError
        Tensors of the wrong shape or dtype, negative ids, stop ids or token ids outside the vocabulary.
    """
    opts = options or AuditOptions()
    eos = normalise_eos_ids(eos_token_ids)
    if not eos:
        raise ValueError("eos_token_ids: empty; pass every id that stops generation.")
    vocab = _vocab_size(model, None) if model is not None else None
    if vocab is None and vocab_size is not None:
        vocab = (int(vocab_size), MODEL_VOCAB)
    report, ref = _audit(
        (prompt_ids, prompt_mask, completion_ids, completion_mask),
        eos=eos,
        pad=None if pad_token_id is None else int(pad_token_id),
        vocab=vocab,
        opts=opts,
        completion_lengths=completion_lengths,
        per_token_logps=per_token_logps,
        model=model,
    )
    check = BatchCheck(report)
    prompt_ok = not any(f.kind in (Kind.RIGHT_PADDED_PROMPT, Kind.EMPTY_PROMPT) for f in report.findings)
    if check.input_findings and prompt_ok:
        fixed = stop_correction(ref)
        if fixed is not None:
            check = BatchCheck(report, *fixed)
    return check
