"""Estimator layer: SNIS entropy, ΔH with uncertainty, ESS, PSIS / truncated / clipped weights.

numpy + scipy only at import time; arviz is imported on first use of PSIS or k̂, and torch
never (DESIGN §1). Inputs are plain per-row arrays, so a training loop, the CLI, a notebook
and a multi-rank run (merge rows first) all call ``estimate`` the same way.

- ``snis``          sequence-level SNIS: :func:`estimate`, :func:`estimate_per_prompt`
- ``per_decision``  per-decision (prefix-ratio) estimators: :func:`estimate_tokens`
- ``results``       ``Estimate``, ``EntropyDelta``, ``TokenDelta``
- ``policy``        the headline policy (DESIGN §5.4): one valid number per step, or why not
- ``proposal``      rows drawn from a sampler q ≠ p0: the p0/q weights' diagnostics and the
  sampler–scorer gap (:func:`sampler_gap`); ``estimate(..., log_q=)`` and
  ``estimate_tokens(..., token_logq=)`` weight H0 by p0/q and H1 by p1/q
- ``weights``       normalisation, PSIS (arviz), truncation, clipping, ESS, k̂
- ``uncertainty``   SEs by linearisation; ``diagnostics`` the warnings; ``inputs`` the checks;
  ``groups`` vectorised per-prompt reductions

>>> res = estimate(log_p0, log_p1, length, group)    # doctest: +SKIP
>>> print(res.summary()); res.delta.bits             # doctest: +SKIP
>>> tok = estimate_tokens(token_logp0, token_logp1, token_entropy0, token_entropy1,
...                       mask, group)                  # doctest: +SKIP
"""

from __future__ import annotations

from isdelta.estimators import weights
from isdelta.estimators.per_decision import estimate_tokens
from isdelta.estimators.policy import METHOD_CODES, Check, Headline, headline
from isdelta.estimators.proposal import ProposalWeights, SamplerGap, sampler_gap
from isdelta.estimators.results import EntropyDelta, Estimate, EstimatorWarning, TokenDelta
from isdelta.estimators.snis import estimate, estimate_per_prompt

__all__ = [
    "METHOD_CODES",
    "Check",
    "EntropyDelta",
    "Estimate",
    "EstimatorWarning",
    "Headline",
    "ProposalWeights",
    "SamplerGap",
    "TokenDelta",
    "estimate",
    "estimate_per_prompt",
    "estimate_tokens",
    "headline",
    "sampler_gap",
    "weights",
]
