"""summary.md of a scored corpus: per-model figures and throughput, curriculum bins, comparison
matrices (from the ``summary.json`` dict)."""

from __future__ import annotations

import numpy as np

__all__ = ["summary_markdown"]


def _fmt(x, spec: str = ".4f", why: str = "no scored tokens") -> str:
    """A number, or ``n/a (why)``: summary.md never shows nan."""
    return f"n/a ({why})" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def summary_markdown(summary: dict) -> str:
    """summary.md: per-model figures, throughput, curriculum bins, comparison matrices."""
    header = (
        "| model | T | texts | tokens | H / token | varentropy / token | NLL / token (bits) | bits / char "
        "| texts/s | tokens/s |"
    )
    lines = [
        f"# isdelta score — {summary['name']}",
        "",
        (
            f"Corpus: `{summary['corpus']}`. Nats unless marked bits; per-token figures are ratios of "
            "sums over the corpus."
        ),
        "",
        "## Models",
        "",
        header,
        "|---" * 10 + "|",
    ]
    for name, r in summary["models"].items():
        t = r["throughput"]
        lines.append(
            f"| {name} | {r['temperature']:g} | {r['n_texts']} | {r['n_tokens']} | "
            f"{_fmt(r.get('entropy_per_token'))} | {_fmt(r.get('varentropy_per_token'))} | "
            f"{_fmt(r.get('nll_per_token_bits'))} | {_fmt(r.get('bits_per_char'))} | "
            f"{_fmt(t['texts_per_s'], '.1f')} | {_fmt(t['tokens_per_s'], '.0f')} |"
        )
    cur = summary.get("curriculum")
    if cur:
        lines += [
            "",
            f"## Curriculum: key = {cur['key']} ({cur['binning']} bins, schedule {cur['schedule']})",
            "",
            "| bin | texts | key range |",
            "|---|---|---|",
        ]
        for b, c in enumerate(cur["counts"]):
            lines.append(f"| {b} | {c} | [{_fmt(cur['edges'][b])}, {_fmt(cur['edges'][b + 1])}] |")
        for side in ("lowest", "highest"):
            lines += ["", f"{side.capitalize()} key:"] + [
                f"- `{e['id']}` ({_fmt(e['key'], '.3f')}): {e['excerpt']!r}" for e in cur["extremes"][side]
            ]
    cmp_ = summary.get("comparison")
    if cmp_ and cmp_.get("skipped"):
        lines += ["", f"## Comparison: n/a ({cmp_['skipped']})"]
    elif cmp_:
        lines += ["", f"## Comparison on per-text {cmp_['stat']} ({cmp_['n_texts']} texts)", ""]
        for title, mat in (
            ("Spearman ρ", cmp_["spearman"]),
            ("Kendall τ", cmp_["kendall"]),
            (f"distance ({cmp_['distance']['metric']})", cmp_["distance"]["matrix"]),
        ):
            names = list(mat)
            lines += [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            lines += [
                f"| {a} | " + " | ".join(_fmt(mat[a][b], why="constant values: no ranks") for b in names) + " |"
                for a in names
            ] + [""]
        ratio = cmp_["pca"]["explained_variance_ratio"]
        lines.append(
            "PCA explained variance ratio: "
            + ", ".join(f"PC{i + 1} {_fmt(r, '.1%', 'the models coincide')}" for i, r in enumerate(ratio))
        )
        if cmp_.get("note"):
            lines += ["", f"Note: {cmp_['note']}."]
    return "\n".join(lines) + "\n"
