"""Mean entropy by token text: which tokens come before, and which are chosen at, uncertain steps.

numpy only (no torch).

The entropy at position t is that of the next-token distribution p(· | x_<t), computed from the
hidden state of the *current* token x_{t−1} (the last prompt token at t = 0) and sampling the
*next* token x_t (the carrier's token there, ``token_id``)::

    current token  x_{t-1}  ──model──▶  p(· | x_<t)  ──chooses──▶  next token x_t
                                        entropy H_t

Grouping H_t by the current token answers "after which tokens is the model unsure" (e.g. after
"=" or "is"), grouping by the next token "which tokens are chosen at uncertain steps". Per token
and model: count, mean entropy under A (p0) and B (p1), and the mean change B − A.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from isdelta.outputs import atomic_write
from isdelta.tokens.table import TokenComparison

__all__ = ["KINDS", "by_token", "token_text_summary", "write_token_texts"]

# kind -> the table column holding the token that groups the positions
KINDS = {"current": "prev_token_id", "next": "token_id"}


def by_token(res: TokenComparison, kind: str) -> list[dict]:
    """Per distinct token of ``kind`` (``"current"`` or ``"next"``): ``token_id``, ``token``,
    ``n``, ``a_entropy``, ``b_entropy``, ``entropy_delta`` (means over its positions), by count
    (most frequent first, then token id)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}.")
    if not len(res):
        return []
    ids, inv = np.unique(np.asarray(res[KINDS[kind]], dtype=np.int64), return_inverse=True)
    n = np.bincount(inv, minlength=len(ids))
    means = {
        k: np.bincount(inv, weights=np.asarray(res[k], dtype=np.float64), minlength=len(ids)) / n
        for k in ("a_entropy", "b_entropy", "entropy_delta")
    }
    order = np.lexsort((ids, -n))
    return [
        {
            "token_id": int(ids[j]),
            "token": res.text(ids[j]),
            "n": int(n[j]),
            **{k: float(v[j]) for k, v in means.items()},
        }
        for j in order
    ]


def token_text_summary(res: TokenComparison, min_count: int = 3, n_list: int = 10) -> dict:
    """Per kind (current / next token) the ``n_list`` tokens seen at least ``min_count`` times with
    the highest and the lowest mean entropy under A, and the largest rise and fall (B − A).

    Returns
    -------
    dict
        ``{"min_count", "n_tokens": {kind: distinct tokens}, kind: {"most_uncertain",
        "least_uncertain", "entropy_up", "entropy_down"}}``, each a list of :func:`by_token` rows.
    """
    out: dict = {"min_count": int(min_count), "n_tokens": {}}
    for kind in KINDS:
        rows = by_token(res, kind)
        out["n_tokens"][kind] = len(rows)
        kept = [r for r in rows if r["n"] >= min_count]
        # stable sorts on a list already ordered by count: ties go to the more frequent token
        out[kind] = {
            "most_uncertain": sorted(kept, key=lambda r: -r["a_entropy"])[:n_list],
            "least_uncertain": sorted(kept, key=lambda r: r["a_entropy"])[:n_list],
            "entropy_up": [r for r in sorted(kept, key=lambda r: -r["entropy_delta"]) if r["entropy_delta"] > 0][
                :n_list
            ],
            "entropy_down": [r for r in sorted(kept, key=lambda r: r["entropy_delta"]) if r["entropy_delta"] < 0][
                :n_list
            ],
        }
    return out


def write_token_texts(path: str | os.PathLike, res: TokenComparison) -> None:
    """``tokens_by_text.csv``: one row per carrier (and ``all carriers``), kind and token, every token."""
    head = ["carrier", "kind", "token_id", "token", "n", "a_entropy", "b_entropy", "entropy_delta"]

    def write(f) -> None:
        w = csv.writer(f)
        w.writerow(head)
        for c in ["all carriers", *res.carriers]:
            sub = res if c == "all carriers" else res.of_carrier(c)
            for kind in KINDS:
                for r in by_token(sub, kind):
                    w.writerow([c, kind] + [f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in head[2:]])

    atomic_write(path, write, text=True)
