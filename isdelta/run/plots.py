"""PNG plots of a run (matplotlib, Agg backend, imported on first use)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from isdelta.outputs import pyplot

__all__ = ["draw_all"]


def plot_weights(path: Path, res, group: np.ndarray) -> None:
    """Sorted normalised weights × G (raw, and the ones the estimate used) against the uniform
    1/G, with k̂; the weights are ``res.weights``, what ``estimate`` computed."""
    plt = pyplot()
    w = res.weights
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    G = counts[inverse.reshape(-1)]  # [N]: each row's prompt size
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.sort(w.w_raw * G)[::-1], "o-", ms=3, label="raw w̄·G")
    if w.scheme != "none":
        ax.plot(np.sort(w.w * G)[::-1], "s-", ms=3, label=f"{w.scheme} w̄·G (used)")
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="uniform (p1 = p0)")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("normalised weight × G")
    ax.set_title(f"importance weights: k̂ = {res.khat:.2f} ({res.khat_status}), ESS = {res.ess:.1f}/{res.n_rows}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_prompt(path: Path, res, per_prompt: list[dict]) -> None:
    """ΔH per prompt with its CI, and the pooled ΔH band (prompts whose ΔH is outside the
    physical bounds, ``delta: None``, are left out; report.json says why)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    per_prompt = [r for r in per_prompt if r["delta"] is not None and r["delta"]["value"] is not None]
    x = [r["prompt"] for r in per_prompt]
    v = np.array([r["delta"]["value"] for r in per_prompt], dtype=float)
    lo = np.array([r["delta"]["ci_low"] if r["delta"]["ci_low"] is not None else np.nan for r in per_prompt])
    hi = np.array([r["delta"]["ci_high"] if r["delta"]["ci_high"] is not None else np.nan for r in per_prompt])
    ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt="o", capsize=3, label="ΔH_p (within-prompt CI)")
    ax.axhspan(res.delta.ci_low, res.delta.ci_high, color="C1", alpha=0.2)
    ax.axhline(res.delta.value, color="C1", label=f"pooled ΔH = {res.delta.value:+.3g} nats")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("prompt")
    ax.set_ylabel("ΔH (nats per sequence)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_token_traces(path: Path, s0: dict, s1: dict, n: int) -> None:
    """Next-token entropy along the completion under p0 and p1, for the n longest samples."""
    plt = pyplot()
    rows = np.argsort(-s0["length"], kind="stable")[:n]
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.8 * len(rows)), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], rows):
        m = s0["mask"][r]
        e0, e1 = s0["token_entropy"][r][m], s1["token_entropy"][r][m]
        ax.plot(e0, lw=1, label="H0 (p0)")
        ax.plot(e1, lw=1, ls="--", label="H1 (p1)")
        ax.set_ylabel(f"row {r}\nnats", fontsize=8)
        # a small update hides under the lines: its difference gets its own axis
        twin = ax.twinx()
        twin.bar(np.arange(len(e0)), e1 - e0, color="C3", alpha=0.5, width=1.0, label="H1 − H0")
        lim = float(np.abs(e1 - e0).max(initial=0)) or 1.0
        twin.set_ylim(-1.1 * lim, 1.1 * lim)
        twin.tick_params(labelsize=7, colors="C3")
    handles = axes[0, 0].get_legend_handles_labels()
    twin_h = twin.get_legend_handles_labels()
    axes[0, 0].legend(handles[0] + twin_h[0], handles[1] + twin_h[1], fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("completion position")
    fig.suptitle("next-token entropy along sampled completions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy_hist(path: Path, s0: dict, s1: dict) -> None:
    """Histogram of next-token entropies at the counted positions of the p0 samples."""
    plt = pyplot()
    e0, e1 = s0["token_entropy"][s0["mask"]], s1["token_entropy"][s1["mask"]]
    top = max(float(e0.max(initial=0)), float(e1.max(initial=0)), 1e-3)
    bins = np.linspace(0, top, 40)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(e0, bins=bins, alpha=0.6, label=f"p0 (mean {e0.mean():.3f})")
    ax.hist(e1, bins=bins, alpha=0.6, label=f"p1 (mean {e1.mean():.3f})")
    ax.set_xlabel(f"next-token entropy (nats; {top / math.log(2):.1f} bits at the right edge)")
    ax.set_ylabel("positions")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("token entropies on the p0 samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(out: Path, res, s0: dict, s1: dict, per_prompt: list[dict], n_trace: int) -> list[str]:
    """Draw every plot into `out`; return the file names."""
    files = {
        "weights.png": lambda p: plot_weights(p, res, s0["group"]),
        "per_prompt.png": lambda p: plot_per_prompt(p, res, per_prompt),
        "entropy_hist.png": lambda p: plot_entropy_hist(p, s0, s1),
    }
    if n_trace > 0:
        files["token_entropy.png"] = lambda p: plot_token_traces(p, s0, s1, n_trace)
    for name, draw in files.items():
        draw(Path(out) / name)
    return list(files)
