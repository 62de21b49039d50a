"""Masks and positions for the rollout layout (DESIGN.md §2–§3).

Layout of one row (prompt_len = 4, C = 5; `p` prompt, `c` completion, `E` stop token, `_` pad)::

    column       0  1  2  3 | 4  5  6  7  8
    input_ids    _  _  p  p | c  c  E  _  _
    attention    0  0  1  1 | 1  1  1  0  0
    positions    0  0  0  1 | 2  3  4  4  4
    counted               . | 1  1  1  0  0     (include_eos=True)
    scored by logits at   3 | 4  5  ...         (column c is scored by the logits at c - 1)

Masks are built from positions and real lengths, never from ``token == pad_id``: pad often
equals EOS (SmolLM2, Qwen, Llama with ``pad = eos``) and a pad-identity mask drops the real EOS.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["completion_mask", "first_stop_index", "normalise_eos_ids", "position_ids"]


def normalise_eos_ids(eos_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    """Return the stop-token ids as a sorted tuple of ints (a set may hold several, as in Qwen)."""
    if eos_token_ids is None:
        return ()
    if isinstance(eos_token_ids, int):
        return (int(eos_token_ids),)
    if isinstance(eos_token_ids, torch.Tensor):
        eos_token_ids = eos_token_ids.flatten().tolist()
    ids = tuple(sorted({int(i) for i in eos_token_ids}))
    if any(i < 0 for i in ids):
        raise ValueError(f"eos_token_ids must be non-negative token ids; got {ids}.")
    return ids


def _real_lengths(completion_ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Real (non-pad) completion lengths [N]; all C columns are real when `lengths` is None."""
    N, C = completion_ids.shape
    if lengths is None:
        return torch.full((N,), C, dtype=torch.long, device=completion_ids.device)
    lengths = torch.as_tensor(lengths, device=completion_ids.device).long()
    if lengths.shape != (N,):
        raise ValueError(
            f"lengths must have shape [N] = [{N}] (one real completion length per row); got {tuple(lengths.shape)}."
        )
    bad = ((lengths < 0) | (lengths > C)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"lengths must lie in [0, C={C}]; rows {bad[:10]} have {lengths[bad[:10]].tolist()}. "
            "Pass the number of real completion tokens per row (the attention mask's row sum "
            "over the completion block)."
        )
    return lengths


def first_stop_index(
    completion_ids: torch.Tensor, eos_token_ids: int | Iterable[int] | None, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Column of the first stop token among each row's real tokens, or the real length if none.

    Parameters
    ----------
    completion_ids : LongTensor [N, C]
        Right-padded completion block.
    eos_token_ids : int or iterable of int
        Every id that stops generation.
    lengths : LongTensor [N], optional
        Real completion lengths; tokens at columns >= length are pads and never a stop.

    Returns
    -------
    LongTensor [N]
        ``t*`` with ``completion_ids[i, t*] in eos_token_ids``, or ``lengths[i]`` when no stop
        token is among the real tokens.
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [N, C]; got shape {tuple(completion_ids.shape)}.")
    C = completion_ids.shape[1]
    real = _real_lengths(completion_ids, lengths)
    cols = torch.arange(C, device=completion_ids.device)  # [C]
    is_real = cols[None, :] < real[:, None]  # [N, C]
    eos = torch.tensor(normalise_eos_ids(eos_token_ids), dtype=completion_ids.dtype, device=completion_ids.device)
    is_stop = torch.isin(completion_ids, eos) & is_real  # [N, C]
    # argmax of a bool row finds the first True; rows without one fall back to the real length.
    first = torch.where(is_stop.any(-1), is_stop.int().argmax(-1), real)
    return first


def completion_mask(
    completion_ids: torch.Tensor,
    eos_token_ids: int | Iterable[int] | None,
    lengths: torch.Tensor | None = None,
    include_eos: bool = True,
) -> torch.Tensor:
    """The counted-token mask of DESIGN.md §3.

    A token counts when it is a real generated token at or before the first stop token
    (the stop token itself only with ``include_eos=True``). A completion without a stop token
    (cut at ``max_new_tokens`` or by a stop string) counts all its real tokens. Pads, whatever
    their id, never count; a pad id equal to the EOS id changes nothing.

    Parameters
    ----------
    completion_ids : LongTensor [N, C]
        Right-padded completion block (the columns after the common prompt block).
    eos_token_ids : int or iterable of int
        Every id that stops generation (a set: Qwen has several).
    lengths : LongTensor [N], optional
        Real completion lengths (the attention mask's row sum over the completion block).
        ``None`` treats all C columns as real.
    include_eos : bool
        Count the first stop token (default) or not. With ``False`` an immediate stop gives an
        empty row (L = 0).

    Returns
    -------
    BoolTensor [N, C]

    Examples
    --------
    >>> ids = torch.tensor([[5, 2, 2, 2]])       # pad == eos == 2
    >>> completion_mask(ids, eos_token_ids=2, lengths=torch.tensor([2])).int().tolist()
    [[1, 1, 0, 0]]
    """
    C = completion_ids.shape[1]
    real = _real_lengths(completion_ids, lengths)
    stop = first_stop_index(completion_ids, eos_token_ids, real)  # [N]
    has_stop = stop < real
    last = torch.where(has_stop & include_eos, stop + 1, stop)  # exclusive end, [N]
    cols = torch.arange(C, device=completion_ids.device)
    return cols[None, :] < last[:, None]  # [N, C]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch: ``clamp(cumsum(attention_mask) - 1, min=0)``.

    Pass them explicitly to every forward: without them a left-padded row starts at position
    ``n_pads`` instead of 0, which RoPE models partly absorb and absolute-position models
    (GPT-2) do not.

    Parameters
    ----------
    attention_mask : Tensor [N, T]
        1 on real tokens, 0 on pads.

    Returns
    -------
    LongTensor [N, T]
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [N, T]; got shape {tuple(attention_mask.shape)}.")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
