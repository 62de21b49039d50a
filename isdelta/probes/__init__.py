"""torch probes of an update (DESIGN.md §6): ΔH₁ in parameter space, step-size sweeps, tokens.

- :func:`gradient_delta`: ⟨∇θ H(θ0), θ1 − θ0⟩ from p0's samples (score-function probe loss).
- :func:`step_sweep`: the true ΔH(α) of θ0 + α(θ1 − θ0) on the same samples, against ΔH₁·α.
- :func:`run_probe`: both, plus the comparison report (tables, plots), as the run pipeline
  calls it. matplotlib is imported only when plots are drawn.
- :func:`compare_tokens`: per-position entropy, top-k, nucleus, tail and KL of two models on the
  same carriers, classified lock / fork / diffuse / mixed; :func:`run_tokens` adds the tables
  and plots, as the run pipeline calls it.

Every name loads on first use, so ``isdelta.probes.token_classify`` (numpy only, imported by the
run config) does not pull in torch.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(("GradientDelta", "gradient_delta", "parameter_delta", "restore_parameters",
                     "snapshot_parameters"), "gradient"),
    **dict.fromkeys(("SweepResult", "first_order_rate", "gap_terms", "moved_along", "per_prompt_points",
                     "step_sweep"), "sweep"),
    **dict.fromkeys(("probe_report", "markdown_lines", "run_probe"), "report"),
    **dict.fromkeys(("TokenOptions", "compare_tokens", "run_tokens"), "tokens"),
    "TokenComparison": "token_result",
    "TokenThresholds": "token_classify",
    "classify": "token_classify",
    "select_positions": "token_positions",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 (a list, built once)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"isdelta.probes.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'isdelta.probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
