"""Audit checks that need only a trainer's tensors: the reference, masks, prompt padding (loss weights:
``audit_weights.py``; positions: ``audit_positions.py``).

The reference is DESIGN.md §2–§3, built from positions and real lengths (never ``token ==
pad_id``): :func:`~isdelta.engine.completion_mask` counts real tokens up to and including the first
stop token, :func:`~isdelta.engine.position_ids` is ``clamp(cumsum(attention_mask) - 1, min=0)``.
The one thing the tensors do not always say is a completion's real length, since the mask under
audit cannot be its own reference. :func:`build_reference` takes it from ``completion_lengths``,
else from a sampler's ``attention_mask``, else infers it (and says so in the report's notes):

- pad id known and not a stop id: the real tokens end at the last non-pad id;
- pad == eos (or pad unknown): a row ends at its first stop id (which HF generate and vLLM emit),
  or uses every column. A completion cut by a stop string and padded with pad == eos then reads
  as one that stopped, and pads after a completion without a stop look like real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from isdelta.engine.audit_report import Finding, Kind, spans
from isdelta.engine.masking import completion_mask as _completion_mask
from isdelta.engine.masking import first_stop_index

__all__ = [
    "Reference",
    "as_tensor",
    "build_reference",
    "cells_finding",
    "check_completion_mask",
    "check_prompt",
    "check_token_ids",
    "stop_correction",
]

SOURCE_TRAILING_PADS = "inferred from the trailing pad ids"
SOURCE_FIRST_STOP = "inferred from the first stop id"
_FIX_MASK = (
    "Build the mask from real lengths and the first stop, never from token != pad_id: "
    "isdelta.engine.completion_mask(completion_ids, eos_token_ids, lengths) with lengths the real "
    "(sampled) completion lengths."
)


def as_tensor(name: str, x, ndim: int, *, integer: bool = False, binary: bool = False) -> torch.Tensor:
    """``x`` as a CPU tensor with ``ndim`` dims; a ``ValueError``/``TypeError`` that says what arrived."""
    try:
        t = torch.as_tensor(x).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a tensor or an array; got {type(x).__name__}.") from e
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}.")
    if integer and (t.is_floating_point() or t.is_complex()):
        what = "integer token ids" if name.endswith("_ids") else "integers"
        hint = " Pass the ids, not embeddings." if name.endswith("_ids") else ""
        raise ValueError(f"{name} must hold {what}; got dtype {t.dtype}.{hint}")
    if binary and ((t != 0) & (t != 1)).any():
        raise ValueError(
            f"{name} must hold only 0 and 1; got values such as {sorted(set(t.flatten().tolist()))[:5]}. "
            "Pass per-token loss weights as loss_weights=, not as a mask."
        )
    return t


@dataclass(frozen=True)
class Reference:
    """The batch under audit and the reference conventions derived from it.

    Attributes
    ----------
    prompt_ids, prompt_mask : LongTensor [N, P]
    completion_ids : LongTensor [N, C]
    user_mask : BoolTensor [N, C]  the mask under audit.
    eos : tuple of int  stop ids.
    pad : int or None  pad id.
    include_eos : bool  the convention audited against.
    lengths : LongTensor [N]  real completion lengths; ``lengths_source`` says where they came from.
    stop : LongTensor [N]  first stop column among the real tokens, or the real length.
    mask : BoolTensor [N, C]  the reference counted mask.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    user_mask: torch.Tensor
    eos: tuple[int, ...]
    pad: int | None
    include_eos: bool
    lengths: torch.Tensor
    lengths_source: str
    stop: torch.Tensor
    mask: torch.Tensor

    @cached_property  # the checks read these several times per batch: computed once
    def has_stop(self) -> torch.Tensor:
        return self.stop < self.lengths  # [N]

    @cached_property
    def at_stop(self) -> torch.Tensor:
        """[N, C]: each row's first stop token among its real tokens (no cell in a row without one)."""
        cols = torch.arange(self.completion_ids.shape[1])[None, :]
        return self.has_stop[:, None] & (cols == self.stop[:, None])

    @property
    def pad_is_eos(self) -> bool:
        return self.pad is not None and self.pad in self.eos

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # [N, P + C]

    @property
    def attention(self) -> torch.Tensor:
        """[N, P + C]: the prompt mask, then 1 on each row's real completion tokens."""
        C = self.completion_ids.shape[1]
        real = (torch.arange(C)[None, :] < self.lengths[:, None]).long()  # [N, C]
        return torch.cat([self.prompt_mask.long(), real], 1)


def build_reference(
    prompt_ids, prompt_mask, completion_ids, completion_mask, *, eos, pad, include_eos, lengths=None, attention=None
) -> tuple[Reference, list[str]]:
    """Validate the tensors and derive the reference; return it with notes on what was inferred."""
    p_ids = _token_ids("prompt_ids", prompt_ids)
    p_mask = as_tensor("prompt_mask", prompt_mask, 2, binary=True).long()
    c_ids = _token_ids("completion_ids", completion_ids)
    user = as_tensor("completion_mask", completion_mask, 2, binary=True).bool()
    (N, P), C = p_ids.shape, c_ids.shape[1]
    if p_mask.shape != (N, P) or c_ids.shape[0] != N or user.shape != (N, C):
        raise ValueError(
            f"expected prompt_ids and prompt_mask [N, P] and completion_ids and completion_mask [N, C] with "
            f"one N; got {tuple(p_ids.shape)}, {tuple(p_mask.shape)}, {tuple(c_ids.shape)}, {tuple(user.shape)}."
        )
    notes: list[str] = []
    stop = None
    if lengths is not None:
        real, source = as_tensor("completion_lengths", lengths, 1, integer=True).long(), "given (completion_lengths)"
        if real.shape != (N,) or (real < 0).any() or (real > C).any():
            raise ValueError(
                f"completion_lengths must be [N] = [{N}] counts in [0, C={C}]; got shape {tuple(real.shape)}, "
                f"values {real.tolist()[:8]}. Pass the number of sampled tokens per row."
            )
    elif attention is not None:
        real, source = _lengths_from_attention(attention, N, P, C), "taken from attention_mask"
    else:
        real, source, stop = _infer_lengths(c_ids, eos, pad)
    if stop is None:
        stop = first_stop_index(c_ids, eos, real)  # [N]
    if source in (SOURCE_TRAILING_PADS, SOURCE_FIRST_STOP):
        notes += _inference_notes(stop < real, pad, source)
    ref_mask = _completion_mask(c_ids, eos, real, include_eos=include_eos)  # [N, C]
    ref = Reference(p_ids, p_mask, c_ids, user, eos, pad, include_eos, real, source, stop, ref_mask)
    return ref, notes


def check_token_ids(name: str, ids: tuple[int, ...], vocab: tuple[int, str] | None) -> None:
    """Stop and pad ids must be tokens of the vocabulary ``(V, whose)``: an id outside it is a wrong id,
    not a mask finding (no row could stop on it, and every mask would read as wrong)."""
    if vocab is None:
        return
    bad = [i for i in ids if i >= vocab[0]]
    if bad:
        raise ValueError(
            f"{name}: id {bad[0]} is outside the {vocab[1]} (ids 0-{vocab[0] - 1}): no token can be it, so no "
            "row could stop on it and every mask would read as wrong. Pass the tokenizer's ids "
            "(tokenizer.eos_token_id and the model's generation_config.eos_token_id; tokenizer.pad_token_id)."
        )


def _token_ids(name: str, ids) -> torch.Tensor:
    """Token ids [N, T] as a LongTensor; a negative id (pads included: the forward embeds them) is refused."""
    t = as_tensor(name, ids, 2, integer=True).long()
    bad = (t < 0).any(-1)  # [N]
    if bad.any():
        raise ValueError(
            f"{name}: rows {spans(bad.nonzero().flatten().tolist())} hold negative token ids (e.g. {int(t.min())}); "
            "token ids index the vocabulary, pads included (the forward embeds them). A loss-ignore label such as "
            "-100 belongs in the labels, not the ids: pad with the tokenizer's pad id."
        )
    return t


def _lengths_from_attention(attention, N: int, P: int, C: int) -> torch.Tensor:
    """Real completion lengths [N] from a sampler's attention mask [N, P + C] (right-padded block)."""
    att = as_tensor("attention_mask", attention, 2, binary=True).long()
    if att.shape != (N, P + C):
        raise ValueError(f"attention_mask must be [N, P + C] = [{N}, {P + C}]; got {tuple(att.shape)}.")
    block = att[:, P:]  # [N, C]
    bad = (block[:, 1:] > block[:, :-1]).any(-1) if C > 1 else torch.zeros(N, dtype=torch.bool)
    if bad.any():
        raise ValueError(
            f"attention_mask: rows {spans(bad.nonzero().flatten().tolist())} have holes in the completion block, "
            "so it does not give real lengths. Pass completion_lengths= (sampled tokens per row) instead."
        )
    return block.sum(-1)


def _infer_lengths(ids: torch.Tensor, eos: tuple[int, ...], pad: int | None):
    """``(real, source, stop)``: real completion lengths [N] from the ids alone (the module docstring's rules),
    and the first stop index among them [N] when it came out of the inference (else None)."""
    C = ids.shape[1]
    if pad is not None and pad not in eos:
        cols = torch.arange(1, C + 1)[None, :]  # [1, C]
        return ((ids != pad).long() * cols).max(-1).values, SOURCE_TRAILING_PADS, None  # last non-pad + 1
    stop = first_stop_index(ids, eos)  # [N]: C where no stop; a row ends there, so it is its first stop
    return torch.where(stop < C, stop + 1, torch.full_like(stop, C)), SOURCE_FIRST_STOP, stop


def _inference_notes(stopped: torch.Tensor, pad: int | None, source: str) -> list[str]:
    """What inferring the real lengths assumed; ``stopped`` [N]: rows with a stop among their real tokens."""
    notes = []
    if source == SOURCE_TRAILING_PADS:
        notes.append(
            f"real completion lengths were inferred from trailing pad ids (id {pad}): a completion whose last "
            "sampled tokens are the pad id reads as shorter. Pass completion_lengths= for exact checks."
        )
    elif stopped.any():
        notes.append(
            "real completion lengths were inferred: a row's first stop id is taken as sampled (HF generate and "
            "vLLM stop there), so a completion cut by a stop string and padded with pad == eos reads as one that "
            "stopped. Pass completion_lengths= for exact stop-token checks."
        )
    if source == SOURCE_FIRST_STOP and pad is None and (~stopped).any():
        notes.append(
            "pads after completions without a stop token: not checked (they cannot be told from sampled tokens "
            "without completion_lengths=, a sampler's attention_mask= or a pad id that is not a stop id)."
        )
    return notes


# ---------------------------------------------------------------------------------------------- masks
def _row_view(ref: Reference, r: int, col: int, width: int = 10) -> str:
    """Row ``r`` around column ``col``: ids, the mask under audit and the reference mask."""
    lo = max(0, min(col - width // 2, ref.completion_ids.shape[1] - width))
    cut = slice(lo, lo + width)
    ids = " ".join(str(int(v)) for v in ref.completion_ids[r, cut])
    yours = " ".join(str(int(v)) for v in ref.user_mask[r, cut])
    want = " ".join(str(int(v)) for v in ref.mask[r, cut])
    where = f"columns {lo}-{lo + len(ref.completion_ids[r, cut]) - 1}"
    return f"e.g. row {r}, {where}: ids [{ids}], your mask [{yours}], expected [{want}]"


def cells_finding(kind: str, cells: torch.Tensor, ref: Reference, detail: str, fix: str) -> list[Finding]:
    """A finding over the True cells of ``cells`` [N, C], with an example row, or none."""
    if not cells.any():
        return []
    rows = cells.any(-1).nonzero().flatten().tolist()
    r = rows[0]
    col = int(cells[r].nonzero()[0])
    text = f"{detail} {_row_view(ref, r, col)} (real lengths {ref.lengths_source})."
    return [Finding(kind, tuple(rows), tuple(cells.any(0).nonzero().flatten().tolist()), text, fix)]


def check_completion_mask(ref: Reference) -> list[Finding]:
    """Each cell where the mask under audit and the reference disagree, named by where it lies."""
    user, want = ref.user_mask, ref.mask  # [N, C]
    if torch.equal(user, want):  # the common case, one comparison (a training loop runs this every step)
        return []
    cols = torch.arange(want.shape[1])[None, :]
    has_stop, stop, real = ref.has_stop[:, None], ref.stop[:, None], ref.lengths[:, None]
    at_stop = ref.at_stop  # [N, C]
    masked_out = (~user.any(-1) & want.any(-1))[:, None]  # [N, 1]: reported once, as a whole row
    extra, missing = user & ~want, ~user & want & ~masked_out
    eos_txt = ", ".join(map(str, ref.eos))
    out = []
    if ref.pad_is_eos:
        out += cells_finding(
            Kind.EOS_DROPPED,
            missing & at_stop,
            ref,
            f"the row's first stop token (id in {{{eos_txt}}}) is not counted; with pad == eos (id {ref.pad}) this "
            "is what a mask built from token != pad_id gives: the EOS log-prob is lost from every sequence "
            "that stops, so the model is neither trained nor scored on when to stop.",
            _FIX_MASK + " If your convention excludes the stop token, audit with AuditOptions(include_eos=False).",
        )
    else:
        out += cells_finding(
            Kind.STOP_NOT_COUNTED,
            missing & at_stop,
            ref,
            f"the row's first stop token (id in {{{eos_txt}}}) is not counted.",
            "Count the first stop token (completion_mask(..., include_eos=True)), or audit with "
            "AuditOptions(include_eos=False) if your convention excludes it.",
        )
    out += cells_finding(
        Kind.STOP_COUNTED,
        extra & at_stop,
        ref,
        "the first stop token is counted although the convention audited excludes it.",
        "completion_mask(..., include_eos=False), or audit with include_eos=True if you count it on purpose.",
    )
    out += cells_finding(
        Kind.AFTER_STOP,
        extra & has_stop & (cols > stop),
        ref,
        "tokens after the row's first stop token are counted (real tokens or pads): a sequence ends at its "
        "first stop, and what follows is not a sample of the model.",
        _FIX_MASK + f" Check that eos_token_ids holds every stop id (here {{{eos_txt}}}).",
    )
    out += cells_finding(
        Kind.PADS_NO_STOP,
        extra & ~has_stop & (cols >= real),
        ref,
        "the row has no stop token and the mask counts columns past its real length: pads enter the loss and the "
        "log-probs (a mask that counts 'up to the first EOS, else every column' does this).",
        _FIX_MASK + " A completion without a stop counts its sampled tokens only.",
    )
    out += _not_counted(ref, missing & ~at_stop)
    rows = masked_out[:, 0].nonzero().flatten().tolist()
    if rows:
        no_stop = [r for r in rows if not bool(ref.has_stop[r])]
        out.append(
            Finding(
                Kind.ROW_MASKED,
                tuple(rows),
                (),
                f"{len(rows)} rows with sampled tokens have an all-zero mask ({len(no_stop)} of them without a stop "
                "token: TRL's mask_truncated_completions zeroes completions cut at max_completion_length).",
                "Keep it if you mean to drop these rows from the loss; anything estimated over the samples "
                "(log-prob sums, entropies, ΔH) must still count them, or it is biased towards completions "
                "that stop.",
                block="row",
            )
        )
    return out


def _not_counted(ref: Reference, cells: torch.Tensor) -> list[Finding]:
    """Real tokens before the first stop that the mask leaves out, with a hint at a missing stop id."""
    found = cells_finding(
        Kind.NOT_COUNTED,
        cells,
        ref,
        "sampled tokens before the row's first stop are not counted.",
        "Count every sampled token up to the first stop; check that eos_token_ids holds every stop id and "
        "that the mask is not built from token == pad_id.",
    )
    if not found:
        return found
    r = found[0].rows[0]
    counted = ref.user_mask[r].nonzero().flatten()
    if len(counted):
        end = int(counted[-1])
        tok = int(ref.completion_ids[r, end])
        hint = f" Your mask of row {r} ends at column {end} (token id {tok}): if id {tok} stops generation, add it to eos_token_ids."
        found = [replace(found[0], detail=found[0].detail + hint)]
    return found


def stop_correction(ref: Reference) -> tuple[torch.Tensor, str] | None:
    """The reference mask [N, C] and a note on what it adds, when the mask under audit misses only rows'
    first stop tokens and the real lengths leave no doubt those were sampled; else None.

    Sure: given lengths, or lengths inferred from trailing pads (the stop id is not the pad id). Inferred
    from the first stop (pad == eos, or no pad id), the "stop" after a completion cut by a stop string is
    a pad: corrected only when no row counts its stop (the signature of ``token != pad_id``); a batch where
    some rows count theirs and others do not is left to the caller (``completion_lengths`` decides it).
    """
    user, want = ref.user_mask, ref.mask  # [N, C]
    dropped = ref.at_stop & ~user  # [N, C]: a first stop token the mask leaves out
    diff = user ^ want
    if not ref.include_eos or not diff.any() or (diff & ~dropped).any():
        return None
    inferred = ref.lengths_source == SOURCE_FIRST_STOP
    if inferred and (user & ref.at_stop).any():
        return None
    rows = dropped.any(-1).nonzero().flatten().tolist()
    why = "pad == eos: a mask built from token != pad_id drops it" if ref.pad_is_eos else "the mask stops before it"
    note = (
        f"completion_mask: the first stop token of rows {spans(rows)} was not counted ({why}); it was added, as "
        f"DESIGN.md §3 counts it and the importance weights need the whole sequence (real lengths "
        f"{ref.lengths_source})."
    )
    if inferred:
        note += (
            " Assumed: each such row's first stop id was sampled (HF generate and vLLM stop there); a completion cut "
            "by a stop string and padded with pad == eos would read the same. Pass completion_lengths to be exact."
        )
    return want, note


def check_prompt(ref: Reference) -> list[Finding]:
    """Prompt rows that are not left-padded (the prompt must end at column P − 1) or are empty."""
    pm = ref.prompt_mask  # [N, P]
    P = pm.shape[1]
    empty = ~pm.bool().any(-1)
    seen = pm.cumsum(-1) > 0  # [N, P]: at or after the first real token
    holes = seen & (pm == 0) & ~empty[:, None]  # pads after a real prompt token
    out = []
    if holes.any():
        rows = holes.any(-1).nonzero().flatten().tolist()
        r = rows[0]
        out.append(
            Finding(
                Kind.RIGHT_PADDED_PROMPT,
                tuple(rows),
                tuple(holes.any(0).nonzero().flatten().tolist()),
                f"the prompt mask has pads after real prompt tokens (row {r}: {pm[r].tolist()[-12:]} at its last "
                f"columns), so the prompt does not end at column P - 1 = {P - 1}: the first completion token is "
                "scored by the logits of a pad, and the completion's positions skip the pads.",
                "Left-pad the prompts (tokenizer.padding_side = 'left'); completions stay right-padded.",
                block="prompt",
            )
        )
    if empty.any():
        out.append(
            Finding(
                Kind.EMPTY_PROMPT,
                tuple(empty.nonzero().flatten().tolist()),
                (),
                "rows without a real prompt token: nothing scores their first completion token.",
                "Give every row at least one prompt token (a BOS token will do).",
                block="row",
            )
        )
    return out
