"""Strata of carrier rows: completion length (quantile bins) and correctness.

numpy only (no torch).

Each carrier row (one completion: a sample of p0, a sample of p1, or a reference response) falls
into one length bin and one correctness class, and every position of the row inherits them:

- ``length``: quantile bins of the completion length (real tokens), with edges from the rows of
  *all* carriers together, so that a bin is the same length range on every carrier; tied edges
  merge (fewer bins than asked when many rows share a length). Labels read ``"12–30 tok"``.
- ``correct``: ``"correct"`` where the run's reward is ≥ 0.5 (the rule rewards are 0 or 1),
  ``"incorrect"`` below, ``"unknown"`` where the prompt has no answer (reward NaN) or the
  carrier's rewards were not given.

The generator (which model wrote the carrier) is the carrier itself: p0 samples, p1 samples,
reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["STRATA", "add_strata", "correctness", "length_bins"]

STRATA = ("length", "correct")
CORRECTNESS = ("correct", "incorrect", "unknown")


def length_bins(lengths: np.ndarray, n_bins: int) -> tuple[np.ndarray, list[str]]:
    """Quantile bin of each length [R] and the bins' labels (by the lengths they hold).

    Parameters
    ----------
    lengths : int [R]
        Completion lengths of the rows.
    n_bins : int
        Bins asked for; tied quantiles merge, so there may be fewer.

    Returns
    -------
    bins : int [R]
        0-based bin of each row, in order of length.
    labels : list of str
        ``"lo–hi tok"`` per bin: the shortest and longest length it holds.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"length_bins must be a positive integer; got {n_bins!r}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return np.zeros(0, dtype=np.int64), []
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, int(n_bins) + 1)))
    inner = edges[1:-1]  # a length equal to an inner edge opens the next bin
    bins = np.searchsorted(inner, lengths, side="right")
    used = np.unique(bins)  # drop bins left empty by ties, renumber the rest
    bins = np.searchsorted(used, bins)
    labels = [f"{lengths[bins == b].min()}–{lengths[bins == b].max()} tok" for b in range(len(used))]
    return bins, labels


def correctness(rewards: np.ndarray) -> np.ndarray:
    """``"correct"`` (reward ≥ 0.5), ``"incorrect"`` or ``"unknown"`` (NaN: no answer) per row."""
    r = np.asarray(rewards, dtype=np.float64)
    return np.where(np.isnan(r), "unknown", np.where(r >= 0.5, "correct", "incorrect")).astype(object)


def add_strata(
    table: Mapping[str, np.ndarray], rewards: Mapping[str, np.ndarray] | None, n_bins: int
) -> dict[str, np.ndarray]:
    """The table's columns plus ``length_bin`` and ``correct`` (str [M]) per position.

    Parameters
    ----------
    table : columns of a :class:`~isdelta.tokens.TokenComparison`, with ``carrier``, ``row``
        and ``length`` (the row's completion length).
    rewards : carrier label -> float [N] (the reward of each rollout row; NaN without an answer).
        A carrier not in it is "unknown" throughout.
    n_bins : number of length quantile bins.

    Returns
    -------
    dict of columns (a new dict; the arrays of ``table`` are shared, not copied).
    """
    carrier, row = np.asarray(table["carrier"]), np.asarray(table["row"], dtype=np.int64)
    M = len(row)
    # one entry per (carrier, row) that holds a position: the units whose lengths are binned
    keys = np.array([f"{c}\x00{r}" for c, r in zip(carrier.tolist(), row.tolist())], dtype=object)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    bins, labels = length_bins(np.asarray(table["length"])[first], n_bins)
    out = dict(table)
    out["length_bin"] = np.array(labels, dtype=object)[bins][inverse] if M else np.zeros(0, dtype=object)
    correct = np.full(M, "unknown", dtype=object)
    for c, r in (rewards or {}).items():
        at = carrier == c
        if not at.any():
            continue
        r = np.asarray(r, dtype=np.float64)
        if row[at].max() >= len(r):
            raise ValueError(
                f"rewards[{c!r}] holds {len(r)} values but carrier {c!r} has row {row[at].max()}: pass one "
                "reward per rollout row (NaN where the prompt has no answer)."
            )
        correct[at] = correctness(r[row[at]])
    out["correct"] = correct
    return out
