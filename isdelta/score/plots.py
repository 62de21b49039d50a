"""PNG plots of a scored corpus (matplotlib, Agg backend, imported only when drawing)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from isdelta.outputs import pyplot

__all__ = ["plot_curriculum", "plot_distance", "plot_pca", "plot_predictor", "plot_rank_scatter", "plot_sorted"]


def plot_sorted(path: Path, values: dict[str, np.ndarray], stat: str) -> None:
    """Each model's per-text statistic sorted, against the text's quantile (a quantile curve)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, v in values.items():
        v = np.sort(v[np.isfinite(v)])
        if len(v):
            ax.plot(np.linspace(0, 1, len(v)), v, label=f"{name} (mean {v.mean():.3f})", lw=1.5)
    ax.set(
        xlabel="quantile of texts",
        ylabel=f"{stat} (nats)" if "bits" not in stat else stat,
        title=f"Sorted per-text {stat}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rank_scatter(path: Path, X: np.ndarray, names: list[str], spearman: np.ndarray, stat: str) -> None:
    """Rank of each text under one model against its rank under another (all pairs, up to 6)."""
    from scipy.stats import rankdata

    plt = pyplot()
    pairs = list(combinations(range(len(names)), 2))[:6]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.6), squeeze=False)
    R = np.vstack([rankdata(x) for x in X])  # [M, n]
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter(R[a], R[b], s=10, alpha=0.7)
        ax.plot([1, R.shape[1]], [1, R.shape[1]], color="grey", lw=0.8, ls="--")
        ax.set(xlabel=f"rank under {names[a]}", ylabel=f"rank under {names[b]}", title=f"ρ_s = {spearman[a, b]:.3f}")
        ax.set_aspect("equal")
    fig.suptitle(f"Per-text {stat}: rank vs rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distance(path: Path, D: np.ndarray, names: list[str], metric: str, stat: str) -> None:
    """Heat map of the model distance matrix, values written in the cells."""
    plt = pyplot()
    M = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * M + 3, 1.0 * M + 2.4))
    im = ax.imshow(D, cmap="viridis")
    ax.set_xticks(range(M), names, rotation=30, ha="right")
    ax.set_yticks(range(M), names)
    for i in range(M):
        for j in range(M):
            ax.text(
                j,
                i,
                f"{D[i, j]:.3g}",
                ha="center",
                va="center",
                color="white" if D[i, j] < D.max() / 2 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{metric} distance of per-text {stat}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pca(path: Path, coords: np.ndarray, ratio: np.ndarray, names: list[str], stat: str) -> None:
    """The models on the first two principal axes of their per-text vectors."""
    plt = pyplot()
    xy = np.zeros((len(names), 2))
    xy[:, : min(2, coords.shape[1])] = coords[:, :2]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ax.scatter(xy[:, 0], xy[:, 1], s=40)
    for (x, y), n in zip(xy, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    r = list(ratio) + [0.0, 0.0]
    ax.set(
        xlabel=f"PC1 ({r[0]:.1%} of variance)", ylabel=f"PC2 ({r[1]:.1%})", title=f"PCA of the models' per-text {stat}"
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curriculum(path: Path, key: np.ndarray, edges: np.ndarray, counts: list[int], label: str) -> None:
    """Histogram of the curriculum key with the bin boundaries and each bin's size."""
    plt = pyplot()
    k = key[np.isfinite(key)]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.hist(k, bins=min(40, max(5, len(k) // 2)), color="tab:blue", alpha=0.7)
    for e in edges:
        ax.axvline(e, color="black", lw=0.8, ls="--")
    top = ax.get_ylim()[1]
    for b, c in enumerate(counts):
        ax.text((edges[b] + edges[b + 1]) / 2, top * 0.92, f"bin {b}\nn={c}", ha="center", va="top", fontsize=8)
    ax.set(xlabel=label, ylabel="texts", title="Curriculum key and bins")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_predictor(path: Path, y: np.ndarray, cols: dict[str, np.ndarray], res: dict, p) -> None:
    """Outcome rate by entropy bin (equal-count bins, Wilson 95% intervals) with the fitted
    one-regressor logistic curve, for the mean entropy and the last-token entropy.

    ``y`` and ``cols`` hold the texts with a known outcome; ``res`` is the predictor result and
    ``p`` the config's predictor section (``last``, ``plot_bins``).
    """
    from isdelta.score.predictor import wilson

    plt = pyplot()
    fits = {f["name"]: f for f in res["fits"]}
    panels = [("H_mean", "entropy_mean", "mean token entropy (nats)"), ("H_last", p.last, f"{p.last} (nats)")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    rng = np.random.default_rng(0)  # jitter of the 0/1 rug only
    for ax, (fname, stat, xlabel) in zip(axes[0], panels):
        x = cols[stat]
        ok = np.isfinite(x)
        x, yy = x[ok], y[ok]
        ax.scatter(x, yy + rng.uniform(-0.03, 0.03, len(yy)), s=8, alpha=0.35, color="grey", label="texts (0/1)")
        order = np.argsort(x, kind="stable")
        for part in np.array_split(order, min(p.plot_bins, len(x))):
            if len(part):
                k, n = int(yy[part].sum()), len(part)
                lo, hi = wilson(k, n)
                xm = x[part].mean()
                ax.errorbar(xm, k / n, yerr=[[k / n - lo], [hi - k / n]], fmt="o", color="tab:blue", capsize=3)
        f = fits.get(fname)
        title = fname
        if f and f["status"] == "ok":
            grid = np.linspace(x.min(), x.max(), 200)
            b0, b1 = f["coef"]["const"], f["coef"][stat]
            ax.plot(grid, 1 / (1 + np.exp(-(b0 + b1 * grid))), color="tab:red", label="logistic fit")
            title += f": β = {b1:.3g} (p = {f['p'][stat]:.2g}), AUC {f['auc']:.3f}"
        elif f:
            title += f": {f['status']}"
        ax.set(xlabel=xlabel, ylabel="outcome rate", ylim=(-0.08, 1.08), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Outcome rate by entropy bin ({len(y)} texts, {int(y.sum())} with outcome 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
