"""Lock / fork / diffuse / mixed: what kind of decision a next-token distribution is.

numpy only (no torch).

Each position is classified from one model's sorted probabilities p(1) ≥ p(2) ≥ … (the *full*
model distribution, before the sampling transform), its top-p nucleus size n_p and its tail mass
T = 1 − Σ_{i ≤ tail_k} p(i), in this order (the first rule that holds wins)::

    lock     p(1) ≥ lock_top1  and  n_p ≤ lock_nucleus  and  T ≤ lock_tail
    fork     p(2) ≥ fork_ratio · p(1)  and  p(2) ≥ fork_second  and  n_p ≤ fork_nucleus  and  T ≤ fork_tail
    diffuse  T ≥ diffuse_tail
    mixed    everything else

With the defaults the four are disjoint (a lock's runner-up is ≤ 1 − 0.9 < 0.15, and a lock or a
fork has a tail ≤ 0.05 < 0.2), so the order only matters for custom thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["CLASSES", "TokenThresholds", "classify", "lock_type"]

CLASSES = ("lock", "fork", "diffuse", "mixed")


@dataclass(frozen=True)
class TokenThresholds:
    """Thresholds of :func:`classify` (probabilities and masses in [0, 1], sizes in tokens).

    Attributes
    ----------
    lock_top1 : a lock's top-1 probability is at least this (0.9: one acceptable token).
    lock_nucleus : ... and its top-p nucleus holds at most this many tokens (2).
    lock_tail : ... and the mass beyond the top ``tail_k`` tokens is at most this (0.02: the
        distractors are few and small).
    fork_ratio : a fork's runner-up has at least this fraction of the top-1 probability (0.5:
        two continuations of similar weight) ...
    fork_second : ... and at least this absolute probability (0.15; excludes a flat top) ...
    fork_nucleus : ... and the nucleus holds at most this many tokens (5: most mass sits in a few
        plausible tokens) ...
    fork_tail : ... and the tail is at most this (0.05).
    diffuse_tail : a position whose tail mass is at least this (0.2) is diffuse: mass spread
        beyond the top ``tail_k`` tokens.
    """

    lock_top1: float = 0.9
    lock_nucleus: int = 2
    lock_tail: float = 0.02
    fork_ratio: float = 0.5
    fork_second: float = 0.15
    fork_nucleus: int = 5
    fork_tail: float = 0.05
    diffuse_tail: float = 0.2

    def __post_init__(self) -> None:
        for name in ("lock_top1", "lock_tail", "fork_ratio", "fork_second", "fork_tail", "diffuse_tail"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"thresholds.{name} must lie in [0, 1] (a probability or a mass); got {v}.")
        for name in ("lock_nucleus", "fork_nucleus"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"thresholds.{name} must be a positive number of tokens; got {v}.")

    def to_dict(self) -> dict:
        return asdict(self)


def classify(
    top1: np.ndarray, top2: np.ndarray, nucleus: np.ndarray, tail: np.ndarray, thresholds: TokenThresholds | None = None
) -> np.ndarray:
    """Class of each position: ``"lock"``, ``"fork"``, ``"diffuse"`` or ``"mixed"``.

    Parameters
    ----------
    top1, top2 : float [M]
        The largest and second-largest next-token probabilities.
    nucleus : int [M]
        Tokens needed to reach the top-p mass (the top token always counts).
    tail : float [M]
        Mass beyond the top ``tail_k`` tokens.
    thresholds : TokenThresholds, optional

    Returns
    -------
    ndarray of str [M]
    """
    t = thresholds or TokenThresholds()
    top1, top2, nucleus, tail = map(np.asarray, (top1, top2, nucleus, tail))
    lock = (top1 >= t.lock_top1) & (nucleus <= t.lock_nucleus) & (tail <= t.lock_tail)
    fork = (top2 >= t.fork_ratio * top1) & (top2 >= t.fork_second) & (nucleus <= t.fork_nucleus) & (tail <= t.fork_tail)
    diffuse = tail >= t.diffuse_tail
    return np.select([lock, fork, diffuse], ["lock", "fork", "diffuse"], "mixed").astype(object)


def lock_type(top1_id_a: np.ndarray, top1_id_b: np.ndarray) -> np.ndarray:
    """``"strict"`` where both models put the same token first, ``"swap"`` where they do not [M]."""
    return np.where(np.asarray(top1_id_a) == np.asarray(top1_id_b), "strict", "swap").astype(object)
