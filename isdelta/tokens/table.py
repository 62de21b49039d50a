"""The result of :func:`~isdelta.tokens.compare_tokens`: a table of positions, numpy only.

Column names (every column has one entry per position, [M]; top-k columns are [M, top_k]):

- where: ``carrier``, ``row`` (rollout row), ``step`` (completion position, 0-based),
  ``prompt``, ``token_id`` (the carrier's token there), ``prev_token_id`` (the token before it,
  whose hidden state scores the position: the last prompt token at step 0), ``length`` (the row's
  completion length), ``context`` (decoded text before it); after
  :func:`~isdelta.tokens.strata.add_strata` also ``length_bin`` and ``correct`` (the row's strata);
- per model X ∈ {a, b}, on the full distribution: ``X_entropy``, ``X_varentropy``,
  ``X_chosen_p``, ``X_top1_p``, ``X_top2_p``, ``X_topk_p``, ``X_topk_id``, ``X_nucleus``,
  ``X_tail``; ``b_p_a_top1`` (B's probability of A's top-1 token);
- between the models: ``kl_ab``, ``kl_ba``, ``entropy_delta``, ``top1_delta``,
  ``nucleus_delta``, ``tail_delta`` (each B − A), ``top1_same``;
- the same on the sampling distribution with the suffix ``_trunc`` (top-k ids are shared: the
  transform keeps the ranking); a ``_trunc`` KL is +inf where the kept sets differ;
- classes: ``a_class``, ``b_class`` (lock / fork / diffuse / mixed), ``lock_type`` (strict /
  swap for A's locks, else ""), ``self_correction`` (bool).

Aggregates treat an infinite KL honestly: a mean over positions that include one is inf, and
the number of such positions is reported beside it (``n_inf``); nothing becomes NaN.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write, json_num
from isdelta.tokens.classes import CLASSES

__all__ = ["CATEGORIES", "TokenComparison", "add_deltas"]

# aggregate groups: A's class, and the lock subgroups (self-correction overlaps strict / swap)
CATEGORIES = ("lock", "lock/strict", "lock/swap", "lock/self-correction", "fork", "diffuse", "mixed", "all")
_VIEWS = ("", "_trunc")
_SCALARS = ("entropy", "varentropy", "chosen_p", "top1_p", "top2_p", "nucleus", "tail")
_PAIR = ("kl_ab", "kl_ba", "entropy_delta", "top1_delta", "nucleus_delta", "tail_delta", "b_p_a_top1")


def add_deltas(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the B − A columns (entropy, top-1 p, nucleus, tail) of both views and ``top1_same``."""
    for s in _VIEWS:
        for name, key in (
            ("entropy_delta", "entropy"),
            ("top1_delta", "top1_p"),
            ("nucleus_delta", "nucleus"),
            ("tail_delta", "tail"),
        ):
            table[f"{name}{s}"] = table[f"b_{key}{s}"] - table[f"a_{key}{s}"]
    table["top1_same"] = table["a_topk_id"][:, 0] == table["b_topk_id"][:, 0]
    return table


def _mean(x: np.ndarray) -> float | None:
    """Mean, inf if any value is inf; None for no values."""
    return float(np.mean(x)) if len(x) else None


@dataclass(frozen=True)
class TokenComparison:
    """Per-position comparison of two models (see the module docstring for the columns).

    Attributes
    ----------
    table : dict of str -> ndarray
        Columns of equal length M.
    vocab : dict of int -> str
        Decoded text of every token id the table shows (empty without a tokenizer).
    options : dict
        The :class:`~isdelta.tokens.TokenOptions` used, as a dict.
    """

    table: Mapping[str, np.ndarray]
    vocab: Mapping[int, str] = field(default_factory=dict)
    options: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {k: len(v) for k, v in self.table.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table columns must have one length; got {lengths}.")

    def __len__(self) -> int:
        return len(self.table["row"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.table[name]

    @property
    def carriers(self) -> list[str]:
        """Carrier labels in order of first appearance."""
        return list(dict.fromkeys(self.table["carrier"].tolist()))

    @classmethod
    def concat(cls, parts: Sequence[TokenComparison]) -> TokenComparison:
        """Stack results row-wise (e.g. one per carrier); options must agree."""
        if not parts:
            raise ValueError("concat needs at least one TokenComparison.")
        if any(p.options != parts[0].options for p in parts):
            raise ValueError("cannot concat TokenComparisons made with different options.")
        table = {k: np.concatenate([p.table[k] for p in parts]) for k in parts[0].table}
        vocab = {k: v for p in parts for k, v in p.vocab.items()}
        return cls(table, vocab, parts[0].options)

    def subset(self, index) -> TokenComparison:
        """The positions selected by a bool mask or index array."""
        return TokenComparison({k: v[index] for k, v in self.table.items()}, self.vocab, self.options)

    def of_carrier(self, carrier: str | None) -> TokenComparison:
        return self if carrier is None else self.subset(self.table["carrier"] == carrier)

    # ------------------------------------------------------------------ decoding
    def text(self, token_id: int) -> str:
        """Decoded text of one token id (``<id>`` without a tokenizer)."""
        return self.vocab.get(int(token_id), f"<{int(token_id)}>")

    def ranks(self, i: int, trunc: bool = False) -> list[tuple[str, float, str, float]]:
        """Position i's top-k: (A token, A p, B token, B p) per rank."""
        s = "_trunc" if trunc else ""
        t = self.table
        return [
            (
                self.text(t["a_topk_id"][i, k]),
                float(t[f"a_topk_p{s}"][i, k]),
                self.text(t["b_topk_id"][i, k]),
                float(t[f"b_topk_p{s}"][i, k]),
            )
            for k in range(t["a_topk_id"].shape[1])
        ]

    # ------------------------------------------------------------------ aggregates
    def category_index(self, name: str) -> np.ndarray:
        """bool [M]: the positions of an aggregate group (one of ``CATEGORIES``)."""
        t = self.table
        if name == "all":
            return np.ones(len(self), dtype=bool)
        if name == "lock/self-correction":
            return (t["a_class"] == "lock") & t["self_correction"]
        if name.startswith("lock/"):
            return (t["a_class"] == "lock") & (t["lock_type"] == name.split("/")[1])
        if name not in CLASSES:
            raise ValueError(f"unknown category {name!r}; expected one of {CATEGORIES}.")
        return t["a_class"] == name

    def aggregate(self, index: np.ndarray) -> dict:
        """Count and mean deltas / KLs over the positions in ``index`` (JSON-safe)."""
        t, n = self.table, int(np.sum(index))
        out = {"n": n, "share": n / len(self) if len(self) else None}
        for s in _VIEWS:
            for k in ("top1_delta", "nucleus_delta", "tail_delta", "entropy_delta", "kl_ab", "kl_ba"):
                out[f"{k}{s}"] = json_num(_mean(t[f"{k}{s}"][index]))
        inf = ~np.isfinite(t["kl_ab_trunc"][index]) | ~np.isfinite(t["kl_ba_trunc"][index])
        out["n_inf_trunc"] = int(inf.sum())
        out["top1_same"] = json_num(_mean(t["top1_same"][index].astype(float)))
        out["a_entropy"], out["b_entropy"] = (json_num(_mean(t[k][index])) for k in ("a_entropy", "b_entropy"))
        return out

    def categories(self, carrier: str | None = None) -> list[dict]:
        """One aggregate per group of ``CATEGORIES`` (A's class), on one carrier or all."""
        r = self.of_carrier(carrier)
        return [{"category": c, **r.aggregate(r.category_index(c))} for c in CATEGORIES]

    def transitions(self, carrier: str | None = None) -> dict[str, dict[str, int]]:
        """Counts of A's class → B's class at the same positions."""
        r = self.of_carrier(carrier)
        a, b = r.table["a_class"], r.table["b_class"]
        return {ca: {cb: int(np.sum((a == ca) & (b == cb))) for cb in CLASSES} for ca in CLASSES}

    def interesting(self, k: int, carrier: str | None = None) -> np.ndarray:
        """Indices of the k positions where the models differ most: the largest symmetric KL
        (KL(a‖b) + KL(b‖a)) of the full distributions, ties broken by |top-1 delta|.

        A position met again on another carrier (same prompt, step, token and context: p1's
        samples share their first tokens with p0's when drawn with the same seeds) counts once.
        """
        t = self.table
        idx = np.flatnonzero(self.table["carrier"] == carrier) if carrier is not None else np.arange(len(self))
        order = idx[np.lexsort((-np.abs(t["top1_delta"][idx]), -(t["kl_ab"][idx] + t["kl_ba"][idx])))]
        seen, out = set(), []
        for i in order.tolist():
            key = (t["prompt"][i], t["step"][i], t["token_id"][i], t["context"][i])
            if key not in seen:
                seen.add(key)
                out.append(i)
            if len(out) == k:
                break
        return np.array(out, dtype=np.int64)

    def deciles(self, model: str, carrier: str | None = None, n: int = 10, n_examples: int = 3) -> list[dict]:
        """Entropy quantile bins of one model (``"a"`` or ``"b"``) with the commonest tokens."""
        r = self.of_carrier(carrier)
        h = r.table[f"{model}_entropy"]
        if not len(h):
            return []
        edges = np.quantile(h, np.linspace(0, 1, n + 1))
        which = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, n - 1)
        out = []
        for q in range(n):
            sel = which == q
            ids, counts = np.unique(r.table["token_id"][sel], return_counts=True)
            top = np.argsort(-counts, kind="stable")[:n_examples]
            out.append(
                {
                    "decile": q + 1,
                    "low": float(edges[q]),
                    "high": float(edges[q + 1]),
                    "n": int(sel.sum()),
                    "mean": json_num(_mean(h[sel])),
                    "examples": [(r.text(ids[j]), int(counts[j])) for j in top],
                }
            )
        return out

    def headline(self, carrier: str | None = None) -> dict:
        """Means over all positions (of one carrier): entropies, KLs, deltas, class counts."""
        r = self.of_carrier(carrier)
        out = r.aggregate(np.ones(len(r), dtype=bool))
        out["classes_a"] = {c: int(np.sum(r.table["a_class"] == c)) for c in CLASSES}
        out["classes_b"] = {c: int(np.sum(r.table["b_class"] == c)) for c in CLASSES}
        return out

    def to_dict(self) -> dict:
        """Headline figures, per-category aggregates and transitions per carrier (JSON-safe)."""
        return {
            "n_positions": len(self),
            "options": self.options,
            "carriers": {
                c: {"headline": self.headline(c), "categories": self.categories(c), "transitions": self.transitions(c)}
                for c in self.carriers
            },
        }

    # ------------------------------------------------------------------ csv
    def csv_columns(self) -> list[str]:
        """Scalar columns in CSV order (top-k columns are expanded by :meth:`to_csv`)."""
        head = [
            "carrier",
            "row",
            "prompt",
            "step",
            "token_id",
            *(c for c in ("prev_token_id", "length", "length_bin", "correct") if c in self.table),
            "a_class",
            "b_class",
            "lock_type",
            "self_correction",
            "top1_same",
        ]
        body = [f"{m}_{k}{s}" for s in _VIEWS for m in "ab" for k in _SCALARS]
        body += [f"{k}{s}" for s in _VIEWS for k in _PAIR]
        return head + body

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per position: both models, both views, top-k tokens with probabilities, context."""
        t, path = self.table, Path(path)
        cols, k = self.csv_columns(), t["a_topk_id"].shape[1]
        rank = [f"{m}_rank{j + 1}_{f}" for m in "ab" for j in range(k) for f in ("token", "p", "p_trunc")]

        def write(f) -> None:
            w = csv.writer(f)
            w.writerow(cols[:5] + ["token"] + cols[5:] + rank + ["context"])
            for i in range(len(self)):
                vals = [_cell(t[c][i]) for c in cols]
                ranks = [
                    x
                    for m in "ab"
                    for j in range(k)
                    for x in (
                        self.text(t[f"{m}_topk_id"][i, j]),
                        _cell(t[f"{m}_topk_p"][i, j]),
                        _cell(t[f"{m}_topk_p_trunc"][i, j]),
                    )
                ]
                w.writerow(vals[:5] + [self.text(t["token_id"][i])] + vals[5:] + ranks + [t["context"][i]])

        atomic_write(path, write, text=True)


def _cell(x) -> str:
    """A CSV cell: floats with 6 significant digits (inf as "inf"), the rest as str."""
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.6g}"
    return str(x.item() if hasattr(x, "item") else x)
