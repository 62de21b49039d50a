"""A trajectory's rows from its segments, per level, with the own-sample check (pure: no model).

Each row carries two verdicts, one per level of the headline policy (DESIGN.md §5.4): ``valid``
(H and ΔH per sequence) and ``valid_tok`` (per token). The levels are chained separately::

    level       direct rows (the base's samples)         anchor         chained rows
    per seq     while the segment's ``valid`` holds      the last one   + ΔH(j→j+1) per sequence
    per token   while its ``valid_tok`` holds            the last one   + ΔH(j→j+1) per token

so where the base's samples still hold per token at the IS horizon h (a segment whose sequence
level alone failed), the per-token anchor is h and the per-sequence one h − 1. At either level a
step that is not valid at it, or a sum outside the physical bounds, breaks that level's chain:
that row and every later one are not valid at that level, the other level goes on.

The own-sample check. Where checkpoint k sampled itself (the source of a chained step), its row's
H at each level, weighted (direct) or chained, is compared with the plain mean over its own
samples (:meth:`Segment.source_entropy`, independent of the weighted one: another seed)::

    z = |H_row − H_own| / √(SE_row² + SE_own²),   not valid at that level when z > own_sample_z(level)

A level that fails makes that row not valid at it, and every chained row built on it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["Point", "Segment", "chain", "horizon", "own_sample_z"]

UNITS = ("per sequence", "per token")  # the two levels, indexed by ``tok`` (False, True)


@dataclass(frozen=True)
class Segment:
    """ΔH from checkpoint ``source`` to ``target`` on ``source``'s own samples: the sequence-level
    estimate (``res``, with ESS and k̂) and the headline policy's verdict (``decision``).

    When the estimators refuse the scores (e.g. ``target`` gives probability 0 to a sample of
    ``source``: top-k/top-p kept sets that moved), ``res`` is None, ``decision`` is not valid with
    the reason, and ``own`` holds the source's entropy from its own samples (no weight needed).
    """

    source: int
    target: int
    res: object  # EntropyDelta, or None: refused
    decision: object  # Headline
    own: tuple | None = None  # (H, H per token) of source, when res is None

    def source_entropy(self) -> tuple:
        """(H, H per token) of ``source`` from its own samples: plain means, no importance weight."""
        if self.res is None:
            return self.own
        return self.res.h0_rb or self.res.h0, self.res.h0_tok_rb or self.res.h0_tok


@dataclass(frozen=True)
class Point:
    """One row of the trajectory: checkpoint ``k``'s entropy and its change from the base.

    ``kind`` says how the per-sequence level was reached: "base", "direct" (the base's samples) or
    "chained" (a sum of consecutive steps from the anchor); ``kind_tok`` the same for the per-token
    level (it is "direct" where ``kind`` is "chained" at a horizon the base's samples still reach
    per token). ``step`` is the segment that reached the row (direct: base → k; chained:
    (k−1) → k). ``valid`` and ``valid_tok`` are the two levels' verdicts: ``h``, ``delta`` are None
    unless ``valid``, ``h_tok``, ``delta_tok`` None unless ``valid_tok``; ``reason`` says why
    (prefixed by the level when only one fails, or when the two fail for different reasons).
    ``own``: (H, H per token) as plain means over k's own samples, where it sampled; ``own_z``,
    ``own_z_tok``: the own-sample check's z where it ran (None elsewhere).
    """

    k: int
    kind: Literal["base", "direct", "chained"]
    valid: bool
    valid_tok: bool
    h: object = None  # Estimate, per sequence
    h_tok: object = None  # Estimate, per token
    delta: object = None  # Estimate, ΔH from the base, per sequence
    delta_tok: object = None  # Estimate, per token
    step: Segment | None = None
    reason: str | None = None
    kind_tok: Literal["base", "direct", "chained"] | None = None  # None: the same as ``kind``
    own: tuple | None = None  # (Estimate, Estimate) from k's own samples
    own_z: float | None = None
    own_z_tok: float | None = None

    def __post_init__(self) -> None:
        if self.kind_tok is None:
            object.__setattr__(self, "kind_tok", self.kind)


def own_sample_z(level: float) -> float:
    """The own-sample check's threshold on z: Φ⁻¹(1 − (1 − level)/4).

    The two-sided normal quantile at level 1 − (1 − level)/2: Bonferroni over the row's two
    levels (per sequence, per token). When a row's weighted H and its own-sample mean agree in
    distribution (normal, both unbiased) each level false-alarms with probability ≤ (1 − level)/2,
    so the row with probability ≤ 1 − level, the miscoverage of one CI. Level 0.95 gives 2.24,
    0.99 gives 2.81.
    """
    from scipy.stats import norm

    if not 0 < level < 1:
        raise ValueError(f"own_sample_z: level must lie in (0, 1), got {level}; pass estimator.level, e.g. 0.95")
    return float(norm.ppf(1 - (1 - level) / 4))


@dataclass(frozen=True)
class _Cell:
    """One level of one row: H and ΔH from the base (None unless valid), how it was reached."""

    kind: str
    h: object = None
    delta: object = None
    reason: str | None = None  # None: valid
    z: float | None = None  # the own-sample check's z, where it ran


def _pick(obj, name: str, tok: bool):
    """``obj.name`` at one level: ``name`` per sequence, ``name_tok`` per token."""
    return getattr(obj, f"{name}_tok" if tok else name)


def _add(a, b, level: float):
    """a + b for independent estimates: values add, SEs add in quadrature (a normal CI)."""
    from scipy.stats import norm

    from isdelta.estimators import Estimate

    z = float(norm.ppf((1 + level) / 2))
    return Estimate.normal(a.value + b.value, math.hypot(a.se, b.se), level, z)


def _zero(level: float):
    from isdelta.estimators import Estimate

    return Estimate(0.0, 0.0, 0.0, 0.0, level)


def _out_of_bounds(h: float, tok: bool, log_support: float | None) -> str | None:
    """Why a chained H is impossible (entropy ≥ 0; per token ≤ ln|support|), else None."""
    if h < 0:
        return f"H = {h:.4g} {UNITS[tok]} is negative"
    if tok and log_support is not None and h > log_support:
        return f"H per token {h:.4g} is above ln|support| = {log_support:.4g}"
    return None


def _own_check(cell: _Cell, own, k: int, tok: bool, z_max: float) -> _Cell:
    """``cell`` (checkpoint k's H at one level) against ``own``, the plain mean over k's own samples:
    the same cell with its z, or not valid with both numbers when z > ``z_max``."""
    if cell.h is None or own is None:  # no number at this level: nothing to compare
        return cell
    se = math.hypot(cell.h.se, own.se)
    gap = abs(cell.h.value - own.value)
    z = gap / se if se > 0 else (0.0 if gap == 0 else math.inf)
    if z <= z_max:
        return replace(cell, z=z)
    src = "the base's samples" if cell.kind == "direct" else "the chain"
    why = (
        f"H {UNITS[tok]} {cell.h.value:.4g} ± {cell.h.se:.2g} from {src} disagrees with checkpoint {k}'s "
        f"own samples {own.value:.4g} ± {own.se:.2g} (z = {z:.2f} > {z_max:.2f})"
    )
    return _Cell(cell.kind, reason=why, z=z)


def _level(direct: list[Segment], steps: list[Segment], tok: bool, level: float, log_support) -> dict[int, _Cell]:
    """One level's cells by row: direct while the base's samples hold at this level, then the sum
    of steps from the last such row (the anchor), each step's source checked against its own
    samples first."""
    d0, unit = direct[0].decision, UNITS[tok]
    h0 = _pick(d0, "h0", tok) if _pick(d0, "valid", tok) else direct[0].source_entropy()[tok]
    cells = {0: _Cell("base", h0, _zero(h0.level))}
    for seg in direct:
        if not _pick(seg.decision, "valid", tok):
            break
        cells[seg.target] = _Cell("direct", _pick(seg.decision, "h1", tok), _pick(seg.decision, "delta", tok))
    anchor, broken = max(cells), None  # broken: where this level's chain broke
    z_max = own_sample_z(level)
    for seg in steps:
        j, t, d = seg.source, seg.target, seg.decision
        if j > 0:  # checkpoint j sampled itself (the base's row is its own samples' mean already)
            cells[j] = _own_check(cells[j], seg.source_entropy()[tok], j, tok, z_max)
            if broken is None and j >= anchor and cells[j].reason is not None:  # the chain is built on it
                whose = "the anchor's" if j == anchor else "its"
                broken = f"k = {j} ({whose} H {unit} disagreed with its own samples)"
        if t <= anchor:  # reached on the base's samples at this level
            continue
        if broken is None and not _pick(d, "valid", tok):
            broken = f"step {j}→{t} (not valid)"
            cells[t] = _Cell("chained", reason=f"{broken}: {d.reason}")
        elif broken is not None:
            cells[t] = _Cell("chained", reason=f"the chain broke at {broken}, so this level is unknown")
        else:
            step = _pick(d, "delta", tok)
            h, delta = _add(cells[j].h, step, level), _add(cells[j].delta, step, level)
            if why := _out_of_bounds(h.value, tok, log_support):  # each step valid, their sum not
                broken = f"step {j}→{t} (its sum out of bounds)"
                why = f"the chained {why}: the steps' errors added up past a physical bound"
                cells[t] = _Cell("chained", reason=why)
            else:
                cells[t] = _Cell("chained", h, delta)
    return cells


def _reason(seq: str | None, tok: str | None) -> str | None:
    """The row's reason from its two levels' (the level named unless both say the same)."""
    if seq == tok:
        return seq
    return "; ".join(f"{unit}: {r}" for unit, r in zip(UNITS, (seq, tok)) if r) or None


def chain(direct: list[Segment], steps: list[Segment], level: float, log_support: float | None = None) -> list[Point]:
    """The trajectory's rows from the direct segments (base → k, k = 1 … h, the last one the first
    not valid per sequence, or all K valid) and the consecutive ones past the horizon
    ((h−1) → h, …, (K−1) → K).

    Each level is chained on its own (the module docstring): H and ΔH of a chained row are the
    anchor's plus the sum of the steps, their SEs the root sum of squares (independent sample
    sets). A step not valid at a level, a chained H outside the physical bounds (H < 0, or per
    token above ``log_support``), or a row whose H disagrees with its own samples beyond
    :func:`own_sample_z` (``level``) ends that level's chain: its row and every later one are not
    valid at that level, with the reason.
    """
    h = horizon(direct)
    nxt = direct[-1].target if h is None else h - 1  # the per-sequence anchor: the steps start there
    for seg in steps:
        if seg.source != nxt or seg.target != nxt + 1:
            raise ValueError(f"chain: step {seg.source}→{seg.target} does not follow checkpoint {nxt}")
        nxt += 1
    seq, tok = (_level(direct, steps, t, level, log_support) for t in (False, True))
    by_target = {s.target: s for s in direct} | {s.target: s for s in steps}  # a chained row: its step
    own = {s.source: s.source_entropy() for s in [direct[0], *steps]}
    points = []
    for k in sorted(seq | tok):
        unreached = f"the base's samples do not reach it: {by_target[k].decision.reason}" if k in by_target else None
        s, t = (cells.get(k) or _Cell("direct", reason=unreached) for cells in (seq, tok))
        points.append(
            Point(
                k, s.kind, s.reason is None, t.reason is None,
                h=s.h, h_tok=t.h, delta=s.delta, delta_tok=t.delta,
                step=by_target.get(k) if k > 0 else None, reason=_reason(s.reason, t.reason),
                kind_tok=t.kind, own=own.get(k), own_z=s.z, own_z_tok=t.z,
            )
        )  # fmt: skip
    return points


def horizon(direct: list[Segment]) -> int | None:
    """The IS horizon: the first checkpoint whose direct estimate is not valid per sequence (None:
    none). The per-token level may reach further on the base's samples (see :func:`chain`)."""
    return next((s.target for s in direct if not s.decision.valid), None)
