"""The training-loop side: the in-process update step (p0 → p1) and rule rewards (DESIGN.md §7)."""

from __future__ import annotations

from isdelta.training.rewards import REWARDS, answer_match, boxed_match
from isdelta.training.update import UpdateResult, ZeroUpdateError, advantages, update

__all__ = ["REWARDS", "UpdateResult", "ZeroUpdateError", "advantages", "answer_match", "boxed_match",
           "update"]
