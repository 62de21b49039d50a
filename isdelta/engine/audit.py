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
check needs and what it assumed is in the report's ``notes``.

Command line: ``python -m isdelta.engine.audit_cli BATCH.pt [--model PATH] [--eos-id ID] ...``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from isdelta.engine.audit_checks import (
    as_tensor,
    build_reference,
    check_completion_mask,
    check_loss_weights,
    check_prompt,
)
from isdelta.engine.audit_logps import (
    check_logits_alignment,
    check_logp_values,
    check_logps,
    logps_from_logits,
    row_references,
)
from isdelta.engine.audit_positions import audit_positions
from isdelta.engine.audit_report import BatchAuditError, BatchReport, Finding, Kind
from isdelta.engine.masking import normalise_eos_ids
from isdelta.engine.split import SplitLM
from isdelta.engine.transform import LogitTransform

__all__ = [
    "AuditOptions",
    "BatchAuditError",
    "BatchReport",
    "Finding",
    "Kind",
    "assert_batch_ok",
    "audit_batch",
    "batch_arguments",
    "load_batch",
]

FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "completion_lengths",
    "attention_mask",
    "position_ids",
    "per_token_logps",
    "logits",
    "loss_weights",
)
REQUIRED = FIELDS[:4]
ALIASES = {"old_per_token_logps": "per_token_logps"}  # TRL's name in _prepare_inputs' output


@dataclass(frozen=True)
class AuditOptions:
    """Options of :func:`audit_batch`.

    Attributes
    ----------
    include_eos : the convention audited: the first stop token counts (DESIGN.md §3) or not.
    temperature : the temperature the per-token log-probs (or logits) were computed with (TRL:
        ``args.temperature``); the reference divides the logits by it too.
    logp_tol : largest per-token |log p − reference| in nats taken as agreement (fp32 rounding on
        the tests' tiny models is ~1e-6; raise it for a bf16 trainer).
    rows_per_forward : rows per padded forward in the positions check with a model.
    """

    include_eos: bool = True
    temperature: float = 1.0
    logp_tol: float = 1e-3
    rows_per_forward: int = 8

    def __post_init__(self) -> None:
        LogitTransform(self.temperature)  # validates it
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
        Tensors of the wrong shape or dtype, or no stop ids.
    """
    opts = options or AuditOptions()
    eos, pad = _stop_and_pad(eos_token_ids, pad_token_id, tokenizer, model)
    ref, notes = build_reference(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        eos=eos,
        pad=pad,
        include_eos=opts.include_eos,
        lengths=completion_lengths,
        attention=attention_mask,
    )
    N, C = ref.completion_ids.shape
    if model is not None:
        _check_vocab(ref, model)
    checked = ["completion mask", "prompt padding"]
    findings = check_completion_mask(ref) + check_prompt(ref)
    if position_ids is None:
        notes.append(
            "positions: not checked (pass position_ids=, or position_ids='implicit' if the trainer passes none)."
        )
    else:
        checked.append("positions")
        findings += audit_positions(ref, position_ids, attention_mask, model, opts.rows_per_forward)
    transform = LogitTransform(opts.temperature)
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
    return BatchReport(tuple(findings), N, tuple(checked), tuple(notes))


def _check_vocab(ref, model: torch.nn.Module) -> None:
    V = SplitLM.of(model).vocab_size
    if int(ref.input_ids.max()) >= V:
        raise ValueError(
            f"token ids up to {int(ref.input_ids.max())} but the model's vocabulary has {V}: the batch was "
            "tokenized for another model. Pass the trainer's own model."
        )


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


def batch_arguments(tensors: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`audit_batch`'s tensor arguments picked from a trainer's dict (TRL's ``_prepare_inputs``
    output, a saved batch); other keys are ignored.

    Parameters
    ----------
    tensors : mapping of str to Tensor
    names : mapping of str to str, optional
        Field → key for keys named otherwise, e.g. ``{"completion_mask": "response_mask"}``. TRL's
        ``old_per_token_logps`` is read as ``per_token_logps`` without it.
    """
    names = dict(names or {})
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; the fields are {list(FIELDS)}.")
    out: dict[str, Any] = {}
    for field in FIELDS:
        key = names.get(field, field)
        if key not in tensors and field not in names:
            key = next((a for a, f in ALIASES.items() if f == field and a in tensors), key)
        if key in tensors and tensors[key] is not None:
            out[field] = tensors[key]
        elif field in names:
            raise ValueError(f"key {key!r} (for {field}) is not in the batch; its keys are {sorted(tensors)}.")
    missing = [f for f in REQUIRED if f not in out]
    if missing:
        raise ValueError(
            f"the batch lacks {missing}; its keys are {sorted(tensors)}. Map keys named otherwise with "
            "names={field: key} (command line: --key field=key)."
        )
    return out


def load_batch(path: str | Path) -> dict[str, Any]:
    """A saved batch: a dict of tensors in a ``.pt`` file (``torch.load(weights_only=True)``) or a
    ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"{path}: expected a .pt or .safetensors file; got {path.suffix or 'no suffix'!r}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(
            f"{path} is not a torch file of tensors that loads with weights_only=True "
            f"(save plain tensors, ints and lists): {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors (torch.save(batch, path)).")
    return dict(obj)
