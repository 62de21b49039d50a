"""Which completion positions to inspect, and the decoded text around them.

numpy + ``re`` only (no torch).

A *position* (r, c) is completion column c of rollout row r: the next-token distribution that
chose ``completion_ids[r, c]`` (scored by the hidden state at column prompt_len + c − 1,
DESIGN.md §2). Only counted positions (the engine's completion mask) are ever selected.

``positions`` is one of

- ``"all"``: every counted position;
- ``"every:K"``: counted positions with c ≡ 0 (mod K) (steps 0, K, 2K, … of each completion);
- ``"random:N"``: N counted positions drawn without replacement (seeded; all if fewer);
- ``"pattern"``: the positions whose token lies inside a match of a regex (``patterns``, on
  the decoded completion), each widened by ``window`` tokens either side, plus ``n_random``
  further random counted positions (a baseline to compare the marked positions with).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "DEFAULT_PATTERNS",
    "DEFAULT_SELF_CORRECTION",
    "PositionSpec",
    "compile_patterns",
    "contexts",
    "parse_positions",
    "row_pieces",
    "select_positions",
    "self_correction",
]

# formatting and reasoning markers (case-sensitive; prefix a pattern with (?i) to ignore case)
DEFAULT_PATTERNS = (r"\\boxed", r"\bLet\b", r"\bSuppose\b", r"\bWait\b", r"</think>")
# a lock right after one of these is a self-correction lock
DEFAULT_SELF_CORRECTION = (r"(?i)\bwait\b", r"(?i)\blet me check\b", r"(?i)\bactually\b")


@dataclass(frozen=True)
class PositionSpec:
    """A parsed ``positions`` string: ``kind`` and its number (K of every:K, N of random:N)."""

    kind: Literal["all", "every", "random", "pattern"]
    n: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind in ("all", "pattern") else f"{self.kind}:{self.n}"


def parse_positions(spec: str | PositionSpec) -> PositionSpec:
    """Parse ``"all"``, ``"every:K"``, ``"random:N"`` or ``"pattern"``; ValueError otherwise."""
    if isinstance(spec, PositionSpec):
        return spec
    help_ = (
        'expected "all", "every:K" (every K-th step), "random:N" (N random positions) or '
        '"pattern" (around regex markers)'
    )
    if not isinstance(spec, str):
        raise TypeError(f"positions must be a string, {help_}; got {type(spec).__name__} {spec!r}.")
    kind, sep, num = spec.strip().partition(":")
    if kind in ("all", "pattern") and not sep:
        return PositionSpec(kind)
    if kind in ("every", "random") and sep:
        try:
            n = int(num)
        except ValueError:
            n = 0
        if n >= 1:
            return PositionSpec(kind, n)
        raise ValueError(f"positions {spec!r}: {kind}:K needs a positive integer after the colon, e.g. {kind}:8.")
    raise ValueError(f"positions: {help_}; got {spec!r}.")


def compile_patterns(patterns: Sequence[str], field: str = "patterns") -> list[re.Pattern]:
    """Compiled regexes; a bad one raises ValueError naming the field and the pattern."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(
                f"{field}: {p!r} is not a valid regular expression ({e}). Escape "
                r"backslashes in YAML single quotes, e.g. '\\boxed'."
            ) from e
    return out


# ---------------------------------------------------------------------------- decoded text
def row_pieces(completion_ids: np.ndarray, lengths: np.ndarray, decode) -> list[list[str]]:
    """Decoded text of each real completion token, per row (each distinct id decoded once).

    Parameters
    ----------
    completion_ids : int [N, C]
    lengths : int [N]  real completion tokens per row.
    decode : callable id -> str  (e.g. ``lambda i: tok.decode([i])``).
    """
    cache: dict[int, str] = {}
    out = []
    for ids, L in zip(np.asarray(completion_ids), np.asarray(lengths)):
        row = []
        for i in ids[: int(L)].tolist():
            if i not in cache:
                cache[i] = decode(i)
            row.append(cache[i])
        out.append(row)
    return out


def contexts(pieces: list[list[str]], rows: np.ndarray, cols: np.ndarray, n_tokens: int) -> np.ndarray:
    """The decoded ``n_tokens`` completion tokens before each position [M] (object array of str)."""
    return np.array(
        ["".join(pieces[r][max(0, c - n_tokens) : c]) for r, c in zip(rows.tolist(), cols.tolist())], dtype=object
    )


def self_correction(context: np.ndarray, patterns: Sequence[str]) -> np.ndarray:
    """bool [M]: the context before the position matches one of ``patterns``."""
    regs = compile_patterns(patterns, "self_correction")
    return np.array([any(r.search(s) for r in regs) for s in context], dtype=bool)


def _marked(pieces: list[list[str]], C: int, regs: list[re.Pattern], window: int) -> np.ndarray:
    """bool [N, C]: tokens overlapping a regex match on the decoded row, widened by ±window."""
    out = np.zeros((len(pieces), C), dtype=bool)
    for r, row in enumerate(pieces):
        if not row:
            continue
        ends = np.cumsum([len(p) for p in row])  # char end of each token
        starts = ends - np.array([len(p) for p in row])
        text = "".join(row)
        for reg in regs:
            for m in reg.finditer(text):
                lo, hi = m.start(), max(m.end(), m.start() + 1)
                hit = np.flatnonzero((starts < hi) & (ends > lo))  # tokens overlapping [lo, hi)
                if len(hit):
                    out[r, max(0, hit[0] - window) : min(C, hit[-1] + window + 1)] = True
    return out


# ---------------------------------------------------------------------------- selection
def _random(counted: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """bool [N, C]: n counted positions without replacement (all when fewer)."""
    flat = np.flatnonzero(counted)
    pick = flat if n >= len(flat) else rng.choice(flat, size=n, replace=False)
    out = np.zeros(counted.size, dtype=bool)
    out[pick] = True
    return out.reshape(counted.shape)


def select_positions(
    counted: np.ndarray,
    spec: str | PositionSpec,
    *,
    seed: int = 0,
    pieces: list[list[str]] | None = None,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    window: int = 2,
    n_random: int = 16,
) -> np.ndarray:
    """The selected positions, bool [N, C], always a subset of ``counted``.

    Parameters
    ----------
    counted : bool [N, C]  the engine's completion mask (``rollouts.mask(include_eos)``).
    spec : str or PositionSpec  see the module docstring.
    seed : int  for ``random:N`` and the random part of ``pattern``.
    pieces : decoded tokens per row (:func:`row_pieces`); needed by ``pattern``.
    patterns, window, n_random : the ``pattern`` selection.
    """
    spec = parse_positions(spec)
    counted = np.asarray(counted, dtype=bool)
    C = counted.shape[1]
    if spec.kind == "all":
        return counted.copy()
    if spec.kind == "every":
        return counted & (np.arange(C) % spec.n == 0)[None, :]
    rng = np.random.default_rng(seed)
    if spec.kind == "random":
        return _random(counted, spec.n, rng)
    if pieces is None:
        raise ValueError(
            'positions="pattern" matches regexes on decoded text: pass the tokenizer '
            "(compare_tokens(..., tokenizer=tok))."
        )
    marked = _marked(pieces, C, compile_patterns(patterns), window) & counted
    return marked | _random(counted & ~marked, n_random, rng)
