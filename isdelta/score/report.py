"""summary.md of a scored corpus: per-model figures and throughput, curriculum bins, comparison
matrices (from the ``summary.json`` dict)."""

from __future__ import annotations

import numpy as np

__all__ = ["predictor_markdown", "summary_markdown"]


def _fmt(x, spec: str = ".4f", why: str = "not finite") -> str:
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
        why = _why_missing(r)
        whole = (
            why if why != "not finite" or r.get("n_not_finite") else "no text scored whole: truncated, or prefix none"
        )
        idle = "no text scored in this run: resumed"
        lines.append(
            f"| {name} | {r['temperature']:g} | {r['n_texts']} | {r['n_tokens']} | "
            f"{_fmt(r.get('entropy_per_token'), why=why)} | {_fmt(r.get('varentropy_per_token'), why=why)} | "
            f"{_fmt(r.get('nll_per_token_bits'), why=why)} | {_fmt(r.get('bits_per_char'), why=whole)} | "
            f"{_fmt(t['texts_per_s'], '.1f', idle)} | {_fmt(t['tokens_per_s'], '.0f', idle)} |"
        )
    cur = summary.get("curriculum")
    if cur:
        lines += [
            "",
            f"## Curriculum: key = {cur['key']} ({cur['binning']} bins, schedule {cur['schedule']}"
            + (f", a saw-tooth of {cur['cycles']} ramps" if cur.get("cycles", 1) > 1 else "")
            + ")",
            "",
            "| bin | texts | key range |",
            "|---|---|---|",
        ]
        for b, c in enumerate(cur["counts"]):
            lo, hi = (_fmt(cur["edges"][j], why="no text has a finite key") for j in (b, b + 1))
            lines.append(f"| {b} | {c} | [{lo}, {hi}] |")
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
    if summary.get("predictor"):
        lines += [""] + predictor_markdown(summary["predictor"])
    return "\n".join(lines) + "\n"


def _why_missing(r: dict) -> str:
    """Why a model's corpus figure is not shown: nothing scored, or scored but not finite."""
    if not r.get("n_tokens"):
        return "no scored tokens"
    n = r.get("n_not_finite")
    return f"not finite in {n} of {r['n_texts']} scored texts" if n else "not finite"


def _p(x) -> str:
    """A p-value: 3 significant digits, or "< 1e-16" below double precision's resolution."""
    if x is None:
        return "n/a"
    return "< 1e-16" if x < 1e-16 else format(x, ".3g")


def _outcome_line(pred: dict) -> str:
    o = pred["outcome"]
    if o["source"] == "label":
        return f"Outcome: the corpus field `{o['field']}`."
    return (
        f"Outcome: whether {o['model']}'s own sampled answer is right ({o['reward']}; accuracy "
        f"{o['accuracy']:.3f} over {o['n_answered']} answers, saved in `{o['answers']}`)."
    )


def predictor_markdown(pred: dict) -> list[str]:
    """The predictor section: the regression table, then the correlation matrices."""
    lines = ["## Entropy as a predictor of the outcome", "", _outcome_line(pred)]
    if pred.get("skipped"):
        return lines + ["", f"No fit: {pred['skipped']}"]
    lines += [
        "",
        f"Regressors: per-text statistics under {pred['model']} (nats). {pred['n_used']} texts "
        f"({pred['n_positive']} with outcome 1); left out: {pred['n_no_outcome']} without an outcome, "
        f"{pred['n_unscored']} without a scored token. Logistic regressions (statsmodels, maximum "
        f"likelihood); SE {pred.get('se', 'ordinary')}; LR = 2(ℓ − ℓ₀) against the intercept-only "
        "model (it treats the texts as independent); AUC in-sample.",
        "",
        f"| model | term | β | SE | z | p | {pred['level']:.0%} CI | AUC | LR χ² (df) | LR p | pseudo R² |",
        "|---" * 11 + "|",
    ]
    notes = []
    for f in pred["fits"]:
        head = [_fmt(f["auc"], ".3f", "not computed"), "", "", ""]
        if f["status"] in ("ok", "no convergence"):
            head[1:] = [f"{f['lr_stat']:.3f} ({f['lr_df']})", _p(f["lr_p"]), f"{f['pseudo_r2']:.3f}"]
            for j, t in enumerate(f["coef"]):
                cells = [
                    f["name"] if j == 0 else "",
                    t,
                    f"{f['coef'][t]:.4g}",
                    _fmt(f["se"][t], ".3g", "undefined"),
                    _fmt(f["z"][t], ".3f", "undefined"),
                    _p(f["p"][t]),
                    f"[{_fmt(f['ci_low'][t], '.3g', 'undefined')}, {_fmt(f['ci_high'][t], '.3g', 'undefined')}]",
                    *(head if j == 0 else ["", "", "", ""]),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        else:
            head[1:] = ["n/a", "n/a", "n/a"]
            lines.append(
                f"| {f['name']} | {', '.join(f['terms'])} | n/a ({f['status']}) | | | | | " + " | ".join(head) + " |"
            )
        if f["note"]:
            notes.append(f"- {f['name']}: {f['note']}.")
    if notes:
        lines += ["", *notes]
    for group, mats in pred["correlations"].items():
        for kind, mat in mats.items():
            names = list(mat)
            lines += ["", f"{kind.capitalize()} correlations, {group} statistics:", ""]
            lines += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            lines += [f"| {a} | " + " | ".join(_fmt(mat[a][b], ".3f", "constant") for b in names) + " |" for a in names]
    return lines
