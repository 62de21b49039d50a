"""isdelta: how much did this update change the model's entropy, and how sure are we?

Heavy modules load on first use: ``import isdelta`` imports neither torch, arviz, matplotlib nor
pydantic, so a training job or a GPU box without the plotting stack can import it cheaply.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Rollouts": "isdelta.engine",
    "EngineConfig": "isdelta.engine",
    "LogProbEngine": "isdelta.engine",
    "LogitTransform": "isdelta.engine",
    "SequenceScores": "isdelta.engine",
    "completion_mask": "isdelta.engine",
    "position_ids": "isdelta.engine",
    "load_model": "isdelta.engine",
    "check_compatible": "isdelta.engine",
    "sample": "isdelta.engine",
    "Samples": "isdelta.engine",
    "update": "isdelta.training",
    "EntropyMonitor": "isdelta.training",
    "estimate": "isdelta.estimators",
    "estimate_tokens": "isdelta.estimators",
    "EntropyDelta": "isdelta.estimators",
    "TokenDelta": "isdelta.estimators",
    "Estimate": "isdelta.estimators",
    "compare_tokens": "isdelta.tokens",
    "audit_batch": "isdelta.engine.audit",
    "assert_batch_ok": "isdelta.engine.audit",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'isdelta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
