"""The training-loop side: the in-process update step (p0 → p1), rule rewards (DESIGN.md §7), the
monitor (ΔH of each step) and the guard (a step's ΔH predicted and held in a band)."""

from __future__ import annotations

# EntropyMonitor: ΔH of each optimizer step inside any training loop (monitor.py, distributed.py)
from isdelta.training.distributed import gather_rows
from isdelta.training.fresh import distinct_prompts, fresh_rows
from isdelta.training.guard import EntropyGuard, GuardDecision, step_direction
from isdelta.training.monitor import (
    EntropyMonitor,
    MonitorConfig,
    MonitorError,
    MonitorResult,
    MonitorStep,
    MonitorWarning,
    Snapshot,
)
from isdelta.training.rewards import REWARDS, answer_match, boxed_match
from isdelta.training.update import UpdateResult, ZeroUpdateError, advantages, update

__all__ = [
    "REWARDS",
    "EntropyGuard",
    "EntropyMonitor",
    "GuardDecision",
    "MonitorConfig",
    "MonitorError",
    "MonitorResult",
    "MonitorStep",
    "MonitorWarning",
    "Snapshot",
    "UpdateResult",
    "ZeroUpdateError",
    "advantages",
    "answer_match",
    "boxed_match",
    "distinct_prompts",
    "fresh_rows",
    "gather_rows",
    "step_direction",
    "update",
]
