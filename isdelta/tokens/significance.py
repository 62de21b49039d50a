"""Intervals and sign tests for the token stage's aggregates, by carrier, class and stratum.

numpy + scipy only (no torch).

Every aggregate delta of :meth:`TokenComparison.aggregate` (top-1 Δ, nucleus Δ, tail Δ, ΔH and
the two KLs, on both views) gets a bootstrap interval over *carrier rows* (or prompts), never
positions (:mod:`~isdelta.tokens.bootstrap` says why), and — for the signed deltas — a flag
"the interval excludes 0" and a sign-test p-value over the rows' own means. One set of
resample counts serves every group and statistic, stratified by carrier kind; aggregates over all
carriers pooled resample prompts instead (each with every carrier's rows of it: p1's samples share
p0's seeds and prefixes, so the carriers' rows of one prompt are not independent).

:func:`probing_rows` answers the fork/lock questions directly: do strict locks sharpen (top-1
Δ > 0), do swaps and self-corrections go negative, do forks keep their nucleus (nucleus Δ ≈ 0)?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from isdelta.outputs import json_num
from isdelta.tokens.bootstrap import resample_counts, sign_test, unit_sums, weighted_ci
from isdelta.tokens.strata import STRATA
from isdelta.tokens.table import CATEGORIES, TokenComparison

__all__ = ["PROBES", "CarrierBootstrap", "probing_rows", "strata_summary"]

_VIEWS = ("", "_trunc")
SIGNED = ("top1_delta", "nucleus_delta", "tail_delta", "entropy_delta")
STATS = tuple(f"{k}{s}" for s in _VIEWS for k in (*SIGNED, "kl_ab", "kl_ba"))
ALL_CARRIERS = "all carriers"

# the probing questions: (label, group, statistic, the claim's sign: +1 / -1, or 0 for "no change")
PROBES = (
    ("strict locks", "lock/strict", "top1_delta", 1),
    ("swaps", "lock/swap", "top1_delta", -1),
    ("self-corrections", "lock/self-correction", "top1_delta", -1),
    ("forks", "fork", "nucleus_delta", 0),
)


@dataclass(frozen=True)
class CarrierBootstrap:
    """Bootstrap resamples of the units of one :class:`TokenComparison`.

    Attributes
    ----------
    units : int [M]   each position's unit (a (carrier, row) or (carrier, prompt) pair).
    counts : float [B, U]   resample counts, stratified by carrier.
    level : float   interval coverage.
    values : float [M, K]   the statistics ``STATS`` per position.
    """

    units: np.ndarray
    counts: np.ndarray
    level: float
    values: np.ndarray

    @classmethod
    def of(
        cls,
        res: TokenComparison,
        n_boot: int = 1000,
        level: float = 0.95,
        seed: int = 0,
        unit: Literal["row", "prompt"] = "row",
        pooled: bool = False,
    ) -> CarrierBootstrap:
        """Units from ``res``'s carrier and row (or prompt) columns; ``n_boot`` stratified resamples.

        ``pooled``: for aggregates over all carriers together, the unit is the prompt with every
        carrier's rows of it (p1's samples are drawn with p0's seeds and share their prefixes,
        and a reference answers the same prompt: rows of one prompt on different carriers are
        not independent), resampled without strata.
        """
        if unit not in ("row", "prompt"):
            raise ValueError(f'bootstrap_unit must be "row" or "prompt"; got {unit!r}.')
        t = res.table
        if pooled:
            key = np.array([f"all\x00{p}" for p in t["prompt"].tolist()], dtype=object)
        else:
            key = np.array([f"{c}\x00{r}" for c, r in zip(t["carrier"].tolist(), t[unit].tolist())], dtype=object)
        names, units = np.unique(key, return_inverse=True) if len(key) else (np.zeros(0, dtype=object), key)
        strata = np.array([n.split("\x00")[0] for n in names.tolist()], dtype=object)
        values = np.stack([np.asarray(t[k], dtype=np.float64) for k in STATS], axis=1) if len(key) else None
        return cls(
            np.asarray(units, dtype=np.int64),
            resample_counts(strata, n_boot, seed),
            level,
            values if values is not None else np.zeros((0, len(STATS))),
        )

    def intervals(self, index: np.ndarray) -> dict:
        """CI fields of the positions in ``index`` (bool [M]), JSON-safe.

        For every statistic k of ``STATS``: ``k_ci`` = [lo, hi] (None without an interval); for
        the signed deltas also ``k_excl0`` (the interval excludes 0) and ``k_sign_p`` (sign test
        over units). ``n_units``: units holding a position of the group.
        """
        sums, n = unit_sums(self.values[index], self.units[index], self.counts.shape[1])
        iv = weighted_ci(sums, n, self.counts, self.level)
        p = sign_test(sums, n)
        out: dict = {"n_units": iv.n_units}
        for j, k in enumerate(STATS):
            ok = np.isfinite(iv.lo[j]) and np.isfinite(iv.hi[j])
            out[f"{k}_ci"] = [float(iv.lo[j]), float(iv.hi[j])] if ok else None
            if k.split("_trunc")[0] in SIGNED:
                out[f"{k}_excl0"] = bool(iv.excludes_zero[j]) if ok else None
                out[f"{k}_sign_p"] = json_num(float(p[j])) if np.isfinite(p[j]) else None
        return out

    def categories(self, res: TokenComparison, within: np.ndarray | None = None) -> list[dict]:
        """:meth:`TokenComparison.aggregate` of every group of ``CATEGORIES``, with intervals,
        over the positions in ``within`` (bool [M]; all when None)."""
        within = np.ones(len(res), dtype=bool) if within is None else within
        out = []
        for c in CATEGORIES:
            idx = res.category_index(c) & within
            out.append({"category": c, **res.aggregate(idx), **self.intervals(idx)})
        for r in out:  # share within the selection, as TokenComparison.categories has it
            r["share"] = r["n"] / int(within.sum()) if within.sum() else None
        return out


def _stratum_order(dim: str, values: list[str]) -> list[str]:
    if dim == "length":  # "12–30 tok": by the shortest length
        return sorted(values, key=lambda v: int(v.split("–")[0]))
    return [v for v in ("correct", "incorrect", "unknown") if v in values]


def strata_summary(res: TokenComparison, boot: CarrierBootstrap, carrier: str | None) -> dict:
    """Per stratum dimension (``length``, ``correct``) the categories with intervals on one
    carrier (None: all carriers pooled, still resampled within each carrier)."""
    on = np.ones(len(res), dtype=bool) if carrier is None else res["carrier"] == carrier
    out = {}
    for dim in STRATA:
        col = np.asarray(res.table[f"{dim}_bin" if dim == "length" else dim])
        rows = []
        for v in _stratum_order(dim, sorted(set(col[on].tolist()))):
            sel = on & (col == v)
            rows.append(
                {"stratum": v, "n_units": len(np.unique(boot.units[sel])), "categories": boot.categories(res, sel)}
            )
        out[dim] = rows
    return out


def _verdict(sign: int, lo: float | None, hi: float | None) -> str:
    """What the interval says about the claim (sign +1: > 0, −1: < 0, 0: no change)."""
    if lo is None:
        return "no interval"
    if sign == 0:
        return "consistent (CI ∋ 0)" if lo <= 0 <= hi else ("increased" if lo > 0 else "decreased")
    if (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
        return "supported"
    if (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
        return "contradicted"
    return "inconclusive (CI ∋ 0)"


def probing_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """One row per probing question and carrier (or stratum) from the categories with intervals.

    ``groups`` maps a label (a carrier, or "carrier / stratum") to its :meth:`CarrierBootstrap.categories`.
    """
    out = []
    for question, cat, stat, sign in PROBES:
        for label, cats in groups.items():
            r = next(x for x in cats if x["category"] == cat)
            ci = r[f"{stat}_ci"]
            lo, hi = ci if ci is not None else (None, None)
            out.append(
                {
                    "question": question,
                    "category": cat,
                    "statistic": stat,
                    "claim": {1: "> 0", -1: "< 0", 0: "≈ 0"}[sign],
                    "carrier": label,
                    "estimate": r[stat],
                    "ci": ci,
                    "excl0": r[f"{stat}_excl0"],
                    "sign_p": r[f"{stat}_sign_p"],
                    "n": r["n"],
                    "n_units": r["n_units"],
                    "verdict": _verdict(sign, lo, hi) if r["n"] else "no positions",
                }
            )
    return out
