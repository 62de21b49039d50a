"""Sorting a scored corpus by a statistic and splitting it into curriculum bins (numpy only).

Memory: the key (one float per text) and each text's byte span are held; texts are re-read one
at a time from the corpus file by span, so writing shards never loads the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["Curriculum", "build_curriculum", "combine_key", "write_curriculum"]


@dataclass(frozen=True)
class Curriculum:
    """A corpus sorted by a key and cut into bins.

    Attributes
    ----------
    order : int array [n]
        Positions (into the per-text arrays) of the keyed texts, by increasing key (ties by
        position: a stable sort).
    bin_of : int array [n]
        Bin of ``order[j]``; bins are numbered by increasing key.
    edges : float array [k + 1]
        Bin boundaries on the key scale (equal-count: the keys at the cuts).
    schedule : list of int
        The order in which bins are visited, one entry per step (a saw-tooth visits each bin
        once per cycle: ``[0, 1, 2, 0, 1, 2]``).
    descending : bool
        Texts within a bin run from high to low key (``schedule: decreasing``), so reading the
        shards in schedule order reads the whole corpus sorted.
    excluded : int array
        Positions without a key (texts with no scored token): in no bin.
    cycles : int
        1, or the saw-tooth's number of ramps: step s = (cycle s // k, bin schedule[s]) holds
        every cycles-th text of the bin, starting at its (s // k)-th, so each ramp spans the
        bin's whole key range and every text is emitted exactly once.
    """

    order: np.ndarray
    bin_of: np.ndarray
    edges: np.ndarray
    schedule: list[int]
    descending: bool
    excluded: np.ndarray
    cycles: int = 1

    @property
    def counts(self) -> list[int]:
        return np.bincount(self.bin_of, minlength=len(self.edges) - 1).tolist()

    def members(self, b: int) -> np.ndarray:
        """Positions of bin ``b`` in the order its shard lists them."""
        m = self.order[self.bin_of == b]
        return m[::-1] if self.descending else m

    def steps(self) -> list[tuple[int, int, np.ndarray]]:
        """(cycle, bin, positions) of each step in the order the curriculum emits them.

        One step per bin for increasing / decreasing / a permutation; ``cycles`` ramps over the
        bins for a saw-tooth. Concatenating the steps' positions gives every keyed text once.
        """
        k = len(self.edges) - 1
        return [(s // k, b, self.members(b)[s // k :: self.cycles]) for s, b in enumerate(self.schedule)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_texts": len(self.order),
            "n_excluded": len(self.excluded),
            "bins": len(self.edges) - 1,
            "counts": self.counts,
            "edges": self.edges.tolist(),
            "schedule": self.schedule,
            "cycles": self.cycles,
            "descending": self.descending,
        }


def combine_key(terms: list[tuple[np.ndarray, float]], standardize: bool = False) -> np.ndarray:
    """The curriculum key Σ_j w_j · x_j of per-text columns (NaN where any term is missing).

    A combined key such as H − λ·V is ``[(entropy_mean, 1.0), (varentropy_mean, -λ)]``: with
    λ > 0 a text of high varentropy (a few very unlikely continuations among likely ones) sorts
    as easier than one of the same entropy and low varentropy. H is in nats, V in nats², so λ's
    size depends on the units; √V (nats) or ``standardize`` makes the terms comparable.
    With ``standardize`` each column is first z-scored over the texts where all terms exist,
    so terms in different units (nats, tokens) weigh by their weights, not their scales.
    """
    cols = [np.asarray(x, dtype=np.float64) for x, _ in terms]
    ok = np.logical_and.reduce([np.isfinite(c) for c in cols])
    key = np.zeros_like(cols[0])
    for c, (_, w) in zip(cols, terms):
        if standardize and ok.any():
            sd = c[ok].std()
            c = (c - c[ok].mean()) / (sd if sd > 0 else 1.0)
        key = key + w * c
    return np.where(ok, key, np.nan)


Schedule = Literal["increasing", "decreasing", "sawtooth"] | list[int]


def _schedule(k: int, schedule: Schedule, cycles: int = 1) -> list[int]:
    if schedule == "sawtooth":
        return list(range(k)) * cycles
    if schedule == "increasing":
        return list(range(k))
    if schedule == "decreasing":
        return list(range(k))[::-1]
    if sorted(schedule) != list(range(k)):
        raise ValueError(f"schedule {schedule} is not a permutation of 0..{k - 1}; give each bin once.")
    return [int(b) for b in schedule]


def build_curriculum(
    key: np.ndarray,
    bins: int,
    binning: Literal["count", "width"] = "count",
    schedule: Schedule = "increasing",
    cycles: int | None = None,
) -> Curriculum:
    """Sort texts by ``key`` and cut them into ``bins`` bins.

    Parameters
    ----------
    key : float array [N]
        One value per text; NaN marks a text that is left out (``excluded``).
    bins : int
        k >= 1. Equal-count bins differ in size by at most one; equal-width bins may be empty.
    binning : {"count", "width"}
    schedule : "increasing", "decreasing", "sawtooth", or a permutation of range(k)
        What :meth:`Curriculum.steps` emits, with texts in increasing key within a step unless
        decreasing:

        - increasing: bins 0, 1, …, k−1 (the corpus sorted by increasing key);
        - decreasing: bins k−1, …, 0 (sorted by decreasing key);
        - a permutation: the bins in that order;
        - sawtooth: ``cycles`` ramps 0, 1, …, k−1, 0, 1, …; ramp j takes texts j, j + cycles,
          j + 2·cycles, … of each bin (so every ramp spans easy to hard, and the ramps together
          hold each text once). ``cycles=1`` is increasing. For falling ramps, negate the key.
    cycles : int, optional
        The saw-tooth's number of ramps (>= 1); only with ``schedule="sawtooth"``.
    """
    if (schedule == "sawtooth") != (cycles is not None) or (cycles is not None and cycles < 1):
        raise ValueError(
            f"cycles={cycles} with schedule={schedule!r}: a saw-tooth needs cycles >= 1 and the other schedules none."
        )
    key = np.asarray(key, dtype=np.float64)
    keyed = np.flatnonzero(np.isfinite(key))
    order = keyed[np.argsort(key[keyed], kind="stable")]
    k_sorted = key[order]  # [n]
    n = len(order)
    if binning == "count":
        sizes = [len(part) for part in np.array_split(np.arange(n), bins)]
        bin_of = np.repeat(np.arange(bins), sizes)
        starts = np.cumsum([0] + sizes[:-1])
        edges = np.array([k_sorted[min(s, n - 1)] if n else np.nan for s in starts] + [k_sorted[-1] if n else np.nan])
    else:
        lo, hi = (k_sorted[0], k_sorted[-1]) if n else (np.nan, np.nan)
        edges = np.linspace(lo, hi, bins + 1)
        # right-closed last bin: the maximum belongs to bin k-1, not to a bin k past the end
        bin_of = np.clip(np.searchsorted(edges, k_sorted, side="right") - 1, 0, bins - 1)
    return Curriculum(
        order,
        bin_of.astype(np.int64),
        edges,
        _schedule(bins, schedule, cycles or 1),
        schedule == "decreasing",
        np.flatnonzero(~np.isfinite(key)),
        cycles or 1,
    )


def write_curriculum(out: Path, cur: Curriculum, key: np.ndarray, index, meta: dict) -> None:
    """Write one shard per step, ``order.csv``, ``manifest.json`` and ``schedule.json``.

    A step's shard is ``bin-XX.jsonl`` (the whole bin) for a schedule that visits each bin once,
    and ``cycle-J-bin-XX.jsonl`` for a saw-tooth (ramp J's share of bin XX). Reading
    ``schedule.json``'s ``shards`` in order reads every keyed text once, in schedule order.
    ``index`` is the corpus's :class:`~isdelta.score.corpus.CorpusIndex` (texts are re-read from
    the file one at a time). The folder is written beside ``out`` and swapped in at the end, so
    an interrupted write never leaves a mix of two curricula.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, shards_meta = [], []
    for cycle, b, members in cur.steps():
        name = f"bin-{b:02d}.jsonl" if cur.cycles == 1 else f"cycle-{cycle}-bin-{b:02d}.jsonl"
        with open(tmp / name, "w", encoding="utf-8") as f:
            # streamed: one record in memory at a time
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in index.rows(members))
        files.append(name)
        vals = key[members]
        shards_meta.append(
            {
                "bin": b,
                "cycle": cycle,
                "file": name,
                "count": len(members),
                "key_min": float(vals.min()) if len(vals) else None,
                "key_max": float(vals.max()) if len(vals) else None,
                "edge_low": float(cur.edges[b]),
                "edge_high": float(cur.edges[b + 1]),
            }
        )
    if cur.cycles == 1:  # bin order on disk (bin-00 first), as the shards were always listed
        shards_meta.sort(key=lambda m: m["bin"])
    _write_order(tmp / "order.csv", cur, key, index.ids)
    manifest = {
        **meta,
        **cur.to_dict(),
        "shards": shards_meta,
        "corpus": str(index.path),
        "excluded_ids": [index.ids[p] for p in cur.excluded],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    sched = {
        "order": cur.schedule,
        "cycles": cur.cycles,
        "shards": files,
        "counts": [len(m) for _, _, m in cur.steps()],
        "within_bin": "decreasing key" if cur.descending else "increasing key",
    }
    (tmp / "schedule.json").write_text(json.dumps(sched, indent=2))
    _swap_in(tmp, out)


def _write_order(path: Path, cur: Curriculum, key: np.ndarray, ids: list) -> None:
    """One row per keyed text in schedule order: rank, step, cycle, bin, corpus index, id, key."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "step", "cycle", "bin", "index", "id", "key"])
        rank = 0
        for step, (cycle, b, members) in enumerate(cur.steps()):
            for p in members:
                w.writerow([rank, step, cycle, b, int(p), ids[p], repr(float(key[p]))])
                rank += 1


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
