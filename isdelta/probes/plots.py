"""PNG plots of a probe (matplotlib, Agg backend, imported on first use): ΔH(α) against both
first-order predictions with ESS and k̂, and ΔH₁_p against ΔH_p per prompt."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from isdelta.outputs import pyplot
from isdelta.probes.sweep import SweepResult

__all__ = ["plot_per_prompt", "plot_sweep"]


def _truth_panel(ax, result: SweepResult, per_token: bool) -> None:
    """ΔH(α) with its CI band, the function-space ΔH₁ and the gradient line α·ΔH₁."""
    alphas = np.asarray(result.alphas)
    ests = [e.delta_tok if per_token else e.delta for e in result.estimates]
    v = np.array([e.value for e in ests])
    lo, hi = np.array([e.ci_low for e in ests]), np.array([e.ci_high for e in ests])
    ax.fill_between(alphas, lo, hi, color="C0", alpha=0.2, label=f"{ests[0].level:.0%} CI")
    ax.errorbar(alphas, v, yerr=[v - lo, hi - v], fmt="o-", color="C0", capsize=3, label="ΔH (SNIS)")
    fs = np.array(result.delta1_tok_fs if per_token else [e.delta1.value for e in result.estimates])
    ax.plot(alphas, fs, "s--", color="C1", ms=4, label="ΔH₁ function space")
    g = result.gradient
    est = None if g is None else (g.delta1_tok if per_token else g.delta1)
    if est is not None:
        grid = np.linspace(0, alphas.max(), 50) if alphas.min() <= 0 else np.geomspace(alphas.min(), alphas.max(), 50)
        ax.plot(grid, grid * est.value, "-", color="C2", label="ΔH₁ gradient · α")
        if math.isfinite(est.se):
            ax.fill_between(grid, grid * est.ci_low, grid * est.ci_high, color="C2", alpha=0.12)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("step size α  (θ0 + α(θ1 − θ0))")
    ax.set_ylabel("ΔH (nats per token)" if per_token else "ΔH (nats per sequence)")
    if alphas.min() > 0 and alphas.max() / alphas.min() >= 8:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas])  # the swept steps, not 3×10⁻¹ minor labels
        ax.xaxis.set_minor_formatter(NullFormatter())


def _diagnostics_axis(ax, result: SweepResult) -> list:
    """ESS/N and k̂ on a second axis, k̂'s threshold and the α where k̂ crosses it."""
    twin = ax.twinx()
    alphas = np.asarray(result.alphas)
    twin.plot(alphas, [e.ess_frac for e in result.estimates], ":", color="C4", marker=".", label="ESS / N")
    twin.plot(alphas, [e.khat for e in result.estimates], "-.", color="C3", marker="x", label=r"$\hat{k}$")
    thr = np.nanmin([e.khat_threshold for e in result.estimates])
    twin.axhline(thr, color="C3", lw=0.7, alpha=0.6)
    cross = result.khat_crossing_interp()
    if cross is not None:
        ax.axvline(cross, color="C3", ls="--", lw=1, label=rf"$\hat{{k}}$ > {thr:.2f} from α ≈ {cross:.3g}")
    twin.set_ylabel(r"ESS / N,  $\hat{k}$", color="C3")
    twin.set_ylim(bottom=min(0.0, np.nanmin([e.khat for e in result.estimates] + [0.0])))
    return twin.get_legend_handles_labels()


def plot_sweep(path: Path, result: SweepResult) -> None:
    """ΔH vs α (sequence and per token) with CI band, both ΔH₁ lines, ESS and k̂."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, per_token in zip(axes, (False, True)):
        _truth_panel(ax, result, per_token)
        h2, l2 = _diagnostics_axis(ax, result)
        h1, l1 = ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        ax.set_title("entropy rate" if per_token else "sequence entropy")
    fig.suptitle("ΔH(α) on p0's samples vs the first-order prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_prompt(path: Path, points: list[dict], alpha: float, summary: dict) -> None:
    """Scatter of ΔH₁_p against ΔH_p with CIs, both spaces, and the diagonal."""
    plt = pyplot()

    def ci(key):
        d = [p[key] for p in points]
        v = np.array([x["value"] for x in d], dtype=float)
        lo = np.array([np.nan if x["ci_low"] is None else x["ci_low"] for x in d], dtype=float)
        hi = np.array([np.nan if x["ci_high"] is None else x["ci_high"] for x in d], dtype=float)
        return v, np.nan_to_num(np.vstack([v - lo, hi - v]))

    x, xerr = ci("delta")
    y, yerr = ci("delta1")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2, color="C1", label="ΔH₁_p function space")
    grad = [p["delta1_grad"] for p in points]
    if all(g is not None for g in grad):
        ax.plot(x, grad, "x", ms=6, color="C2", label="ΔH₁_p gradient · α")
    lim = np.nanmax(np.abs(np.concatenate([x + xerr[1], x - xerr[0], [1e-12]])))  # the truth sets the scale
    ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=1, label="ΔH₁ = ΔH")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("ΔH_p (SNIS, within-prompt CI), nats")
    ax.set_ylabel("ΔH₁_p, nats")
    signs = summary.get("fs", {}).get("sign_agreement")
    ax.set_title(
        f"per prompt at α = {alpha:g}" + ("" if signs is None else f"; signs agree {signs:.0%} (fn space)"), fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
