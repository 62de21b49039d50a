"""Prompt groups: vectorised per-prompt reductions over rows sorted by prompt.

Every estimator in this package works within prompts and then averages over prompts
with equal mass 1/P. Rows are sorted once so that each prompt is a contiguous block;
per-prompt sums are then one ``np.add.reduceat`` call instead of a Python loop over
prompts (10^4 prompts would otherwise dominate the run time).

Layout, stated once: a row array has shape [N] in *sorted* order (prompt-major);
a per-prompt array has shape [P] in the order of ``Groups.labels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["BLOCK_ROWS", "Groups", "make_groups"]

# Rows per block of :attr:`Groups.blocks`: a block's float64 arrays (256 KiB each) and their
# temporaries stay in the CPU cache, where numpy's memory-bound passes run about twice as fast
# as over [10^6] arrays; much smaller blocks pay more in Python calls than they save.
BLOCK_ROWS = 2**15


@dataclass(frozen=True)
class Groups:
    """Contiguous prompt blocks of a row array.

    Attributes
    ----------
    labels : ndarray, shape [P]
        The distinct group ids as given by the caller, sorted.
    order : ndarray of int, shape [N] or None
        ``x_sorted = x[order]``; None when the rows already come prompt-major.
    sizes : ndarray of int, shape [P]
        G_p, the number of rows of each prompt.
    starts : ndarray of int, shape [P]
        Index of the first row of each prompt in sorted order.
    """

    labels: np.ndarray
    order: np.ndarray | None
    sizes: np.ndarray
    starts: np.ndarray

    @property
    def n_prompts(self) -> int:
        """P, the number of prompts."""
        return int(self.sizes.shape[0])

    @cached_property
    def n_rows(self) -> int:
        """N, the number of rows."""
        return int(self.sizes.sum())

    def sort(self, x: np.ndarray) -> np.ndarray:
        """Row array in caller order -> sorted (prompt-major) order, [N] -> [N]."""
        return x if self.order is None else x[self.order]

    def unsort(self, x: np.ndarray) -> np.ndarray:
        """Row array in sorted order -> caller order, [N] -> [N]."""
        if self.order is None:
            return x
        out = np.empty_like(x)
        out[self.order] = x
        return out

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt sum of a sorted row array, [N] -> [P]."""
        return np.add.reduceat(x, self.starts)

    def max(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt maximum of a sorted row array, [N] -> [P]."""
        return np.maximum.reduceat(x, self.starts)

    def min(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt minimum of a sorted row array, [N] -> [P]."""
        return np.minimum.reduceat(x, self.starts)

    def mean(self, x: np.ndarray) -> np.ndarray:
        """Per-prompt mean of a sorted row array, [N] -> [P]."""
        return self.sum(x) / self.sizes

    @cached_property
    def row_sizes(self) -> np.ndarray:
        """G_p of each row's prompt, float64 [N] (sorted order); computed once."""
        return self.expand(self.sizes.astype(np.float64))

    @cached_property
    def uniform(self) -> np.ndarray:
        """1/G_p per row, float64 [N]: the within-prompt weights under p0 (computed once)."""
        return 1.0 / self.row_sizes

    @cached_property
    def equal_sizes(self) -> bool:
        """Every prompt has the same number of rows (then a row array reshapes to [P, G])."""
        return bool(np.all(self.sizes == self.sizes[0]))

    def expand(self, per_prompt: np.ndarray) -> np.ndarray:
        """Broadcast a per-prompt array to the rows, [P] -> [N]."""
        return np.repeat(per_prompt, self.sizes)

    def shaped(self, x: np.ndarray) -> np.ndarray:
        """A sorted row array as a [P, G] view when every G_p is equal, else as it is, [N].

        With :meth:`per_row`, ``shaped(x) - per_row(a)`` is ``x - expand(a)`` (the same floats)
        without the [N] copy of ``a`` when the prompts are equal; ``.reshape(-1)`` goes back.
        """
        return x.reshape(self.n_prompts, -1) if self.equal_sizes else x

    def per_row(self, per_prompt: np.ndarray) -> np.ndarray:
        """A per-prompt array that broadcasts against :meth:`shaped` rows: [P, 1] or [N]."""
        return per_prompt[:, None] if self.equal_sizes else self.expand(per_prompt)

    @cached_property
    def blocks(self) -> list[tuple[slice, slice, Groups]]:
        """Consecutive prompts in blocks of about ``BLOCK_ROWS`` rows (whole prompts, at least one):
        ``(prompts, rows, groups)``, the slice of a [P] array, the slice of a sorted [N] array and
        the block's own Groups. A per-prompt sum over a block's rows is the same float as over all
        rows (``np.add.reduceat`` sums each prompt on its own)."""
        cuts = np.searchsorted(self.starts, np.arange(BLOCK_ROWS, self.n_rows, BLOCK_ROWS))
        bounds = np.unique(np.concatenate(([0], cuts, [self.n_prompts])))
        ends = np.append(self.starts, self.n_rows)
        out = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            sub = Groups(self.labels[lo:hi], None, self.sizes[lo:hi], self.starts[lo:hi] - ends[lo])
            out.append((slice(lo, hi), slice(int(ends[lo]), int(ends[hi])), sub))
        return out

    def scratch(self, k: int) -> np.ndarray:
        """``k`` float64 buffers [k, rows of the largest block] for the temporaries of a pass over
        :attr:`blocks`, written with ``out=`` through :meth:`view`: buffers reused block after block
        stay in the CPU cache, where a fresh [n] temporary per operation runs up to 4× slower."""
        return np.empty((k, max(rs.stop - rs.start for _, rs, _ in self.blocks)))

    def view(self, buf: np.ndarray) -> np.ndarray:
        """The first N entries of a scratch buffer, :meth:`shaped` like this (block's) rows."""
        return self.shaped(buf[: self.n_rows])

    def logsumexp(self, log_x: np.ndarray) -> np.ndarray:
        """Per-prompt log Σ exp(log_x), [N] -> [P], shifted by the prompt max for stability.

        The same computation as ``scipy.special.logsumexp`` applied to each prompt.
        """
        m = self.max(log_x)
        # A prompt whose entries are all -inf would give (-inf) - (-inf) = nan.
        m = np.where(np.isfinite(m), m, 0.0)
        return m + np.log(self.sum(np.exp(log_x - self.expand(m))))

    def mean_exp(self, log_x: np.ndarray) -> np.ndarray:
        """Per-prompt mean of e^x (e.g. the mean ratio r), [N] -> [P], from the logsumexp: +inf
        where it passes float64 (after a step of 10³ nats), which every check reading it fails."""
        with np.errstate(over="ignore"):
            return np.exp(self.logsumexp(log_x) - np.log(self.sizes))

    def var(self, x: np.ndarray, ddof: int = 1) -> np.ndarray:
        """Per-prompt variance with ``ddof`` (two-pass, for accuracy), [N] -> [P]."""
        if self.equal_sizes:  # [P, G]: numpy's own two-pass variance, no [N] temporaries
            return x.reshape(self.n_prompts, -1).var(axis=1, ddof=ddof)
        centred = x - self.expand(self.mean(x))
        return self.sum(centred * centred) / (self.sizes - ddof)


def make_groups(codes: np.ndarray, labels: np.ndarray) -> Groups:
    """Groups from integer codes in [0, P) (as from ``np.unique(..., return_inverse=True)``)."""
    sizes = np.bincount(codes, minlength=labels.shape[0])
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    # Rows that already come prompt-major (the engine's layout) need no gather.
    if codes.shape[0] < 2 or bool(np.all(codes[1:] >= codes[:-1])):
        order = None
    else:
        order = np.argsort(codes, kind="stable")
    return Groups(labels=labels, order=order, sizes=sizes, starts=starts)
