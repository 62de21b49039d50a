"""torch probes of an update (DESIGN.md §6): ΔH₁ in parameter space and step-size sweeps.

- :func:`gradient_delta`: ⟨∇θ H(θ0), θ1 − θ0⟩ from p0's samples (score-function probe loss).
- :func:`step_sweep`: the true ΔH(α) of θ0 + α(θ1 − θ0) on the same samples, against ΔH₁·α.
- :func:`run_probe`: both, plus the comparison report (tables, plots), as the run pipeline
  calls it. matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

from isdelta.probes.gradient import (
    GradientDelta,
    gradient_delta,
    parameter_delta,
    restore_parameters,
    snapshot_parameters,
)
from isdelta.probes.sweep import (
    SweepResult,
    first_order_rate,
    gap_terms,
    moved_along,
    per_prompt_points,
    step_sweep,
)

__all__ = [
    "GradientDelta", "SweepResult", "first_order_rate", "gap_terms", "gradient_delta", "markdown_lines",
    "moved_along", "parameter_delta", "per_prompt_points", "probe_report", "restore_parameters",
    "run_probe", "snapshot_parameters", "step_sweep",
]


def __getattr__(name: str):
    # the report module is light too, but keeps plotting code out of `import isdelta.probes`
    if name in ("probe_report", "markdown_lines", "run_probe"):
        from isdelta.probes import report

        return getattr(report, name)
    raise AttributeError(f"module 'isdelta.probes' has no attribute {name!r}")
