"""torch probes of an update (DESIGN.md §6): ΔH₁ in parameter space, step-size sweeps.

- :func:`gradient_delta`: ⟨∇θ H(θ0), θ1 − θ0⟩ from p0's samples (score-function probe loss).
- :func:`step_sweep`: the true ΔH(α) of θ0 + α(θ1 − θ0) on the same samples, against ΔH₁·α.
- :func:`run_probe`: both, plus the comparison report (tables, plots), as the run program calls
  it. matplotlib is imported only when plots are drawn.

The token-level comparison moved to :mod:`isdelta.tokens`; its names (``compare_tokens``,
``TokenComparison``, ``TokenOptions``, ``run_tokens``, ...) still import from here. Every name
loads on first use.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    **dict.fromkeys(("GradientDelta", "gradient_delta"), "isdelta.probes.gradient"),
    **dict.fromkeys(("parameter_delta", "restore_parameters", "snapshot_parameters"), "isdelta.probes.parameters"),
    **dict.fromkeys(
        ("SweepResult", "first_order_rate", "gap_terms", "moved_along", "per_prompt_points", "step_sweep"),
        "isdelta.probes.sweep",
    ),
    **dict.fromkeys(("probe_report", "markdown_lines", "run_probe"), "isdelta.probes.report"),
    **dict.fromkeys(
        (
            "TokenOptions",
            "compare_tokens",
            "run_tokens",
            "TokenComparison",
            "TokenThresholds",
            "classify",
            "select_positions",
        ),
        "isdelta.tokens",
    ),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'isdelta.probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
