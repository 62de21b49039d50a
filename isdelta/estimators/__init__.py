"""Estimator layer: SNIS entropy, ΔH with uncertainty, ESS, PSIS / truncated / clipped weights.

numpy + scipy only at import time; arviz is imported on first use of PSIS or k̂, and torch
never (DESIGN §1). Inputs are plain per-row arrays, so a training loop, the CLI, a notebook
and a multi-rank run (merge rows first) all call ``estimate`` the same way.

>>> res = estimate(log_p0, log_p1, length, group)    # doctest: +SKIP
>>> print(res.summary()); res.delta.bits             # doctest: +SKIP
>>> tok = estimate_tokens(token_logp0, token_logp1, token_entropy0, token_entropy1,
...                       mask, group)                  # doctest: +SKIP
"""

from __future__ import annotations

from isdelta.estimators import weights
from isdelta.estimators.core import estimate
from isdelta.estimators.result import EntropyDelta, Estimate, EstimatorWarning
from isdelta.estimators.tokens import TokenDelta, estimate_tokens

__all__ = [
    "EntropyDelta",
    "Estimate",
    "EstimatorWarning",
    "TokenDelta",
    "estimate",
    "estimate_tokens",
    "weights",
]
