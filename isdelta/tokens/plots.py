"""PNG plots of a :class:`TokenComparison` (matplotlib, Agg backend, imported only here).

One panel per carrier in each figure:

- ``tokens_entropy_steps.png``: mean next-token entropy per generation step under A and B, with
  the 25–75% band across positions at that step;
- ``tokens_entropy_hist.png``: log-density histograms of the token entropies under A and B;
- ``tokens_top1_delta.png``: the top-1 probability delta (B − A) by A's class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isdelta.outputs import pyplot
from isdelta.tokens.table import TokenComparison

__all__ = ["draw_token_plots"]

_GROUPS = ("lock/strict", "lock/swap", "lock/self-correction", "fork", "diffuse", "mixed")


def _panels(plt, n: int, height: float = 3.6, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(5.2 * n, height * rows), squeeze=False)
    return fig, (axes[0] if rows == 1 else axes)


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy_steps(path: Path, res: TokenComparison, names: tuple[str, str]) -> None:
    """Mean entropy per generation step for A and B (25–75% band), one panel per carrier."""
    plt = pyplot()
    fig, axes = _panels(plt, len(res.carriers), height=3.0, rows=2)
    for j, c in enumerate(res.carriers):
        r, ax, dax = res.of_carrier(c), axes[0, j], axes[1, j]
        steps = np.unique(r["step"])
        for key, name, ls, a in (
            ("a_entropy", names[0], "-", ax),
            ("b_entropy", names[1], "--", ax),
            ("entropy_delta", f"{names[1]} − {names[0]}", "-", dax),
        ):
            by = [r[key][r["step"] == s] for s in steps]
            a.plot(
                steps,
                [x.mean() for x in by],
                ls=ls,
                lw=1.2,
                color="C3" if a is dax else None,
                label=f"{name} (mean {r[key].mean():+.3g})" if a is dax else f"{name} (mean {r[key].mean():.3f})",
            )
            a.fill_between(
                steps,
                [np.quantile(x, 0.25) for x in by],
                [np.quantile(x, 0.75) for x in by],
                alpha=0.2,
                color="C3" if a is dax else None,
            )
        dax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("next-token entropy (nats)")
        dax.set_ylabel("entropy change (nats)")
        dax.set_xlabel("generation step")
        ax.set_title(f"{c} ({len(r)} positions)", fontsize=10)
        ax.legend(fontsize=8)
        dax.legend(fontsize=8)
    fig.suptitle(
        "entropy per generation step, mean and 25–75% band (a small update hides under the lines: the change is below)",
        fontsize=10,
    )
    _save(fig, plt, path)


def plot_entropy_hist(path: Path, res: TokenComparison, names: tuple[str, str]) -> None:
    """Log-density histograms of token entropies under A and B, one panel per carrier."""
    plt = pyplot()
    fig, axes = _panels(plt, len(res.carriers))
    top = max(float(res["a_entropy"].max(initial=0)), float(res["b_entropy"].max(initial=0)), 1e-3)
    bins = np.linspace(0, top, 40)
    for ax, c in zip(axes, res.carriers):
        r = res.of_carrier(c)
        for m, name in (("a", names[0]), ("b", names[1])):
            ax.hist(
                r[f"{m}_entropy"],
                bins=bins,
                density=True,
                histtype="step",
                lw=1.5,
                label=f"{name} (median {np.median(r[f'{m}_entropy']):.3f})",
            )
        ax.set_yscale("log")
        ax.set_xlabel("next-token entropy (nats)")
        ax.set_ylabel("density (log scale)")
        ax.set_title(c, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("log-density histograms of next-token entropies", fontsize=11)
    _save(fig, plt, path)


def plot_top1_delta(path: Path, res: TokenComparison, names: tuple[str, str]) -> None:
    """Top-1 probability delta (B − A) per class of A, points over a box, one panel per carrier."""
    plt = pyplot()
    fig, axes = _panels(plt, len(res.carriers), height=4.0)
    rng = np.random.default_rng(0)  # jitter only
    for ax, c in zip(axes, res.carriers):
        r = res.of_carrier(c)
        data = [r["top1_delta"][r.category_index(g)] for g in _GROUPS]
        pos = [i for i, d in enumerate(data) if len(d)]
        if pos:
            ax.boxplot([data[i] for i in pos], positions=pos, widths=0.5, showfliers=False)
        for i in pos:
            ax.plot(i + rng.uniform(-0.18, 0.18, len(data[i])), data[i], ".", ms=3, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(_GROUPS)))
        ax.set_xticklabels(
            [
                f"{g.replace('/', chr(10)).replace('self-correction', 'self-corr.')}\nn={len(d)}"
                for g, d in zip(_GROUPS, data)
            ],
            fontsize=7,
        )
        ax.set_ylabel(f"top-1 p: {names[1]} − {names[0]}")
        ax.set_title(c, fontsize=10)
    fig.suptitle(
        f"top-1 delta by {names[0]}'s class (strict: same top-1; swap: {names[1]} ranks another token first)",
        fontsize=10,
    )
    _save(fig, plt, path)


def draw_token_plots(out: Path, res: TokenComparison, names: tuple[str, str] = ("A", "B")) -> list[str]:
    """Draw the three figures into ``out``; return their file names (none for an empty result)."""
    if not len(res):
        return []
    files = {
        "tokens_entropy_steps.png": plot_entropy_steps,
        "tokens_entropy_hist.png": plot_entropy_hist,
        "tokens_top1_delta.png": plot_top1_delta,
    }
    for name, draw in files.items():
        draw(Path(out) / name, res, names)
    return list(files)
