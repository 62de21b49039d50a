"""Merging per-rank rows before ``estimate``, so a data-parallel run gets one global ΔH.

Each rank scores its own shard of the batch (``EntropyMonitor.before/after`` never talk to other
ranks); the per-row arrays (S0, S1, L, group, ...) are then gathered, in rank order, and every
rank estimates on all rows::

    rank 0   rows [S0 S1 L g] ─┐
    rank 1   rows [S0 S1 L g] ─┼─ all_gather_object ─▶ every rank: concat ─▶ estimate(all rows)
    rank 2   rows [S0 S1 L g] ─┘

Group ids must mean the same prompt on every rank: GRPO-style samplers spread one prompt's G
completions over several ranks, and a per-rank numbering (0, 1, … on each rank) would merge
different prompts. Use global prompt ids (a dataset index), or a key computed from the prompt
tokens, as :class:`isdelta.training.EntropyMonitor` does by default (``group_by="prompt"``).

The rows are a few floats each, so ``all_gather_object`` (pickling, any backend) costs nothing
next to the forward passes. With NCCL it moves the pickles through the current CUDA device:
call ``torch.cuda.set_device(local_rank)`` first, as every launcher does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["all_gather", "all_reduce_sum", "concat_rows", "gather_rows", "reduce_gradients", "world_size"]


def world_size(process_group=None) -> int:
    """Ranks taking part in gathers: 1 unless ``torch.distributed`` is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group=process_group)


def gather_rows(rows: Mapping[str, Any], *, process_group=None) -> dict[str, np.ndarray | None]:
    """Concatenate per-row arrays over all ranks, in rank order; every rank gets the result.

    A collective: every rank of ``process_group`` must call it, with the same keys. Without an
    initialised process group (or with one rank) it returns numpy copies of ``rows``.

    Parameters
    ----------
    rows : mapping of str to array_like [N_rank, ...] or None
        This rank's rows, e.g. ``log_p0``, ``log_p1``, ``length``, ``group`` ([N_rank] each).
        N_rank may differ between ranks (and be 0). A None value must be None on every rank
        (e.g. entropy sums that no rank computed).
    process_group : torch.distributed.ProcessGroup, optional
        Default: the world.

    Returns
    -------
    dict of str to ndarray [Σ N_rank, ...] or None

    Raises
    ------
    ValueError
        The ranks disagree on the keys, on which values are None, or on the trailing shape.

    Notes
    -----
    Group ids are concatenated as they are: they must already be global (see the module doc).
    Naive equivalent on one process: ``{k: np.concatenate([r[k] for r in per_rank_rows])}``.
    """
    local = _as_arrays(rows)
    return concat_rows(all_gather(local, process_group))


def _as_arrays(rows: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """Numpy copies of ``rows`` (tensors detached and moved to the CPU)."""
    if not isinstance(rows, Mapping):
        raise TypeError(f"rows must be a mapping of name -> per-row array; got {type(rows).__name__}.")
    out: dict[str, np.ndarray | None] = {}
    for k, v in rows.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        out[str(k)] = None if v is None else np.array(v, copy=True)
        if out[str(k)] is not None and out[str(k)].ndim == 0:
            raise ValueError(f"rows[{k!r}] is a scalar; pass one value per row (shape [N, ...]).")
    return out


def all_gather(obj: Any, process_group=None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` when not distributed)."""
    n = world_size(process_group)
    if n == 1:
        return [obj]
    gathered: list[Any] = [None] * n
    torch.distributed.all_gather_object(gathered, obj, group=process_group)
    return gathered


def concat_rows(parts: Sequence[Mapping[str, np.ndarray | None]]) -> dict[str, np.ndarray | None]:
    """Row-wise concatenation of the ranks' dicts, checking they agree."""
    keys = list(parts[0])
    for rank, p in enumerate(parts):
        if set(p) != set(keys):
            raise ValueError(
                f"rank {rank} sent keys {sorted(p)} but rank 0 sent {sorted(keys)}: every rank must "
                "gather the same fields. Compute the same per-row arrays on every rank."
            )
    out: dict[str, np.ndarray | None] = {}
    for k in keys:
        none = [rank for rank, p in enumerate(parts) if p[k] is None]
        if none and len(none) != len(parts):
            raise ValueError(
                f"rows[{k!r}] is None on ranks {none} but not on the others: a field must be "
                "present on every rank or on none (e.g. entropy sums: compute them everywhere)."
            )
        if none:
            out[k] = None
            continue
        tails = {p[k].shape[1:] for p in parts}
        if len(tails) > 1:
            raise ValueError(
                f"rows[{k!r}] has trailing shapes {sorted(tails)} on different ranks; "
                "they must agree (only the row count may differ)."
            )
        out[k] = np.concatenate([p[k] for p in parts], axis=0)
    return out


def _device_for(process_group) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for an NCCL-only group,
    else the CPU (gloo, or a ``cpu:gloo,cuda:nccl`` group)."""
    devices = torch.distributed.distributed_c10d._get_object_coll_device(process_group)
    return torch.device("cuda", torch.cuda.current_device()) if devices == "cuda" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float], process_group=None) -> list[float]:
    """``values`` summed element-wise over the ranks (float64; every rank gets the sums).

    A collective. Without an initialised process group it returns ``values`` as floats.
    """
    if world_size(process_group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_for(process_group))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=process_group)
    return t.cpu().tolist()


def reduce_gradients(params: Sequence[torch.Tensor], process_group=None, bucket_elements: int = 1 << 25) -> None:
    """Sum the parameters' ``.grad`` over the ranks, in place (every rank ends with the sum).

    A collective: every rank passes the same parameters in the same order. A parameter without
    a gradient here (its rows were all dropped on this rank) takes part with zeros. Gradients
    are flattened into buckets of at most ``bucket_elements`` per dtype and device, so a
    model with hundreds of tensors costs a few all-reduces, not hundreds.
    """
    if world_size(process_group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in params:
        runs = buckets.setdefault((p.grad.dtype, p.grad.device), [[]])
        if runs[-1] and sum(g.numel() for g in runs[-1]) + p.grad.numel() > bucket_elements:
            runs.append([])
        runs[-1].append(p.grad)
    for runs in buckets.values():
        for grads in runs:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=process_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
