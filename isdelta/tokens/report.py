"""Markdown for summary.md / tokens.md from a :class:`TokenComparison`.

Tokens are shown in code spans with spaces as ``␣``, newlines as ``\\n`` and ``|`` escaped (a
table cell would split on it otherwise); contexts the same, with the position's token in «».
"""

from __future__ import annotations

import numpy as np

from isdelta.tokens.classes import CLASSES
from isdelta.tokens.table import TokenComparison

__all__ = [
    "category_table",
    "markdown_lines",
    "md_token",
    "probing_table",
    "rank_table",
    "strata_table",
    "token_text_tables",
]


def _escape(s: str) -> str:
    return (
        s.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        .replace("|", "\\|")
        .replace("`", "'")
    )


def md_token(s: str) -> str:
    """A token as a visible code span: `␣the`, `\\n`, `\\|`."""
    return f"`{_escape(s).replace(' ', '␣')}`" if s else "`''`"


def _md_context(context: str, token: str, width: int = 90) -> str:
    text = _escape(context)
    text = ("…" + text[-width:]) if len(text) > width else text
    return f"`{text}«{_escape(token)}»`"


def _f(x, spec: str = "+.3f") -> str:
    """Format a number; ``spec`` "g" / "+g": 3 decimals, or 2 significant digits below 0.01
    (a small update moves probabilities by 1e-4, which 3 decimals would show as 0)."""
    if x is None:
        return "–"
    if isinstance(x, str):  # "inf" from json_num
        return "∞" if x == "inf" else x
    if spec in ("g", "+g"):
        sign = "+" if spec == "+g" else ""
        return format(x, f"{sign}.3f") if x == 0 or abs(x) >= 0.01 or not np.isfinite(x) else format(x, f"{sign}.2e")
    return format(x, spec)


def _ci(r: dict, key: str, spec: str) -> str:
    """``value [lo, hi]``, with ``*`` when the interval excludes 0 (signed deltas only)."""
    cell = _f(r.get(key), spec)
    ci = r.get(f"{key}_ci")
    if ci is None:
        return cell
    star = "*" if r.get(f"{key}_excl0") else ""
    return f"{cell} [{_f(ci[0], spec)}, {_f(ci[1], spec)}]{star}"


def category_table(
    res: TokenComparison, carrier: str | None, names: tuple[str, str], rows: list[dict] | None = None
) -> list[str]:
    """Per category (A's class): count, share and mean B − A deltas and KLs (full distribution);
    with ``rows`` from :meth:`~isdelta.tokens.significance.CarrierBootstrap.categories`, each
    with its interval and the carrier rows holding the positions."""
    a, b = names
    rows = res.categories(carrier) if rows is None else rows
    lines = [
        f"| category ({a}'s class) | n | rows | share | top-1 Δ | nucleus Δ | tail Δ | ΔH (nats) "
        f"| KL({a}‖{b}) | KL({b}‖{a}) | same top-1 |",
        "|---|" + "---|" * 10,
    ]
    for r in rows:
        if r["n"] == 0 and r["category"].startswith("lock/"):
            continue
        lines.append(
            f"| {r['category']} | {r['n']} | {r.get('n_units', '–')} | {_f(r['share'], '.0%')} "
            f"| {_ci(r, 'top1_delta', '+g')} | {_ci(r, 'nucleus_delta', '+.2f')} | {_ci(r, 'tail_delta', '+g')} "
            f"| {_ci(r, 'entropy_delta', '+g')} | {_ci(r, 'kl_ab', 'g')} | {_ci(r, 'kl_ba', 'g')} "
            f"| {_f(r['top1_same'], '.0%')} |"
        )
    return lines


def _trunc_table(
    res: TokenComparison, carrier: str | None, names: tuple[str, str], rows: list[dict] | None = None
) -> list[str]:
    """The same on the sampling distribution (after the transform); KL may be ∞."""
    a, b = names
    rows = res.categories(carrier) if rows is None else rows
    lines = [
        f"| category | top-1 Δ | nucleus Δ | tail Δ | ΔH | KL({a}‖{b}) | KL({b}‖{a}) | positions with KL = ∞ |",
        "|---|" + "---|" * 7,
    ]
    for r in rows:
        if r["n"] == 0:
            continue
        lines.append(
            f"| {r['category']} | {_ci(r, 'top1_delta_trunc', '+g')} | {_ci(r, 'nucleus_delta_trunc', '+.2f')} "
            f"| {_ci(r, 'tail_delta_trunc', '+g')} | {_ci(r, 'entropy_delta_trunc', '+g')} "
            f"| {_ci(r, 'kl_ab_trunc', 'g')} | {_ci(r, 'kl_ba_trunc', 'g')} | {r['n_inf_trunc']} |"
        )
    return lines


def probing_table(rows: list[dict]) -> list[str]:
    """The probing questions, one line per question and carrier (or stratum)."""
    lines = [
        "| question | carrier | statistic | claim | estimate [95% CI] | sign test p | positions | rows | verdict |",
        "|---|" + "---|" * 8,
    ]
    for r in rows:
        spec = "+.2f" if r["statistic"].startswith("nucleus") else "+g"
        cell = _ci({"x": r["estimate"], "x_ci": r["ci"], "x_excl0": r["excl0"]}, "x", spec)
        p = "–" if r["sign_p"] is None else f"{r['sign_p']:.2g}"
        lines.append(
            f"| {r['question']} | {r['carrier']} | {r['statistic']} | {r['claim']} | {cell} | {p} "
            f"| {r['n']} | {r['n_units']} | {r['verdict']} |"
        )
    return lines


def strata_table(strata: dict, names: tuple[str, str]) -> list[str]:
    """Per stratum (length bin, correctness) the all-positions aggregates with intervals."""
    a, b = names
    lines = [
        f"| stratum | rows | positions | top-1 Δ | nucleus Δ | tail Δ | ΔH (nats) | KL({a}‖{b}) |",
        "|---|" + "---|" * 7,
    ]
    for dim, rows in strata.items():
        for s in rows:
            r = next(x for x in s["categories"] if x["category"] == "all")
            lines.append(
                f"| {dim}: {s['stratum']} | {s['n_units']} | {r['n']} | {_ci(r, 'top1_delta', '+g')} "
                f"| {_ci(r, 'nucleus_delta', '+.2f')} | {_ci(r, 'tail_delta', '+g')} "
                f"| {_ci(r, 'entropy_delta', '+g')} | {_ci(r, 'kl_ab', 'g')} |"
            )
    return lines


def token_text_tables(texts: dict, names: tuple[str, str]) -> list[str]:
    """Most and least uncertain tokens (mean entropy under A), by current and by next token."""
    a, b = names
    out = []
    for kind, what in (
        ("current", "current token (the input whose hidden state makes the distribution)"),
        ("next", "next token (the token chosen there)"),
    ):
        out += [
            f"By {what}; {texts['n_tokens'][kind]} distinct tokens, listed when met ≥ {texts['min_count']} times:",
            "",
            f"| list | token | n | H {a} | H {b} | ΔH |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("most_uncertain", "most uncertain"), ("least_uncertain", "least uncertain")):
            for r in texts[kind][key]:
                out.append(
                    f"| {label} | {md_token(r['token'])} | {r['n']} | {r['a_entropy']:.3f} | {r['b_entropy']:.3f} "
                    f"| {_f(r['entropy_delta'], '+g')} |"
                )
        out.append("")
    return out


def _transition_table(res: TokenComparison, carrier: str | None, names: tuple[str, str]) -> list[str]:
    a, b = names
    tr = res.transitions(carrier)
    lines = [f"| {a} \\ {b} | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    lines += [f"| {ca} | " + " | ".join(str(tr[ca][cb]) for cb in CLASSES) + " |" for ca in CLASSES]
    return lines


def _decile_table(res: TokenComparison, carrier: str | None, names: tuple[str, str]) -> list[str]:
    da, db = res.deciles("a", carrier), res.deciles("b", carrier)
    a, b = names
    lines = [
        f"| decile | {a}: entropy (nats) | {a}: commonest tokens | {b}: entropy (nats) | {b}: commonest tokens |",
        "|---|---|---|---|---|",
    ]

    def ex(d: dict) -> str:
        return ", ".join(f"{md_token(t)}×{n}" for t, n in d["examples"])

    for x, y in zip(da, db):
        lines.append(
            f"| {x['decile']} | {x['low']:.3f}–{x['high']:.3f} | {ex(x)} | {y['low']:.3f}–{y['high']:.3f} | {ex(y)} |"
        )
    return lines


def rank_table(res: TokenComparison, i: int, names: tuple[str, str]) -> list[str]:
    """Position i: a heading line with context and figures, then "rank | A token (p) | B token (p)"."""
    t, (a, b) = res.table, names
    cls = t["a_class"][i] + (f"/{t['lock_type'][i]}" if t["lock_type"][i] else "")
    cls += " (self-correction)" if t["self_correction"][i] else ""
    head = (
        f"**{cls}** → {b}: {t['b_class'][i]} — {t['carrier'][i]}, row {t['row'][i]}, step {t['step'][i]}: "
        f"{_md_context(t['context'][i], res.text(t['token_id'][i]))}  \n"
        f"KL({a}‖{b}) = {t['kl_ab'][i]:.3g}, KL({b}‖{a}) = {t['kl_ba'][i]:.3g}, "
        f"H {t['a_entropy'][i]:.4f} → {t['b_entropy'][i]:.4f} nats, top-1 Δ {_f(t['top1_delta'][i], '+g')}, "
        f"nucleus {t['a_nucleus'][i]} → {t['b_nucleus'][i]}, tail {t['a_tail'][i]:.3g} → {t['b_tail'][i]:.3g}"
    )
    lines = [head, "", f"| rank | {a} token (prob) | {b} token (prob) |", "|---|---|---|"]
    for k, (ta, pa, tb, pb) in enumerate(res.ranks(i), 1):
        lines.append(f"| {k} | {md_token(ta)} ({pa:.3f}) | {md_token(tb)} ({pb:.3f}) |")
    return lines


def _examples(res: TokenComparison, names, n_interesting: int) -> list[str]:
    out = ["", "### One example per class (the most changed position of each)", ""]
    jeff = res.table["kl_ab"] + res.table["kl_ba"]
    for c in ("lock/strict", "lock/swap", "lock/self-correction", "fork", "diffuse", "mixed"):
        idx = np.flatnonzero(res.category_index(c))
        if len(idx):
            out += rank_table(res, int(idx[np.argmax(jeff[idx])]), names) + [""]
    if n_interesting > 0:
        out += [
            f"### The {n_interesting} most changed positions (largest KL({names[0]}‖{names[1]}) + "
            f"KL({names[1]}‖{names[0]}))",
            "",
        ]
        for i in res.interesting(n_interesting):
            out += rank_table(res, int(i), names) + [""]
    return out


def _intro(res: TokenComparison, names) -> list[str]:
    o, th, (a, b) = res.options, res.options.get("thresholds", {}), names
    tr = o.get("transform", {})
    return [
        f"{a} = before, {b} = after the update; deltas are {b} − {a}, entropies and KLs in nats. "
        f"{len(res)} positions (positions = `{o.get('positions')}`); nucleus = tokens needed to reach "
        f"p = {o.get('top_p')}; tail = mass beyond the top {o.get('tail_k')} tokens. Classes from {a}'s full "
        f"distribution: lock = top-1 ≥ {th.get('lock_top1')}, nucleus ≤ {th.get('lock_nucleus')}, tail ≤ "
        f"{th.get('lock_tail')}; fork = runner-up ≥ {th.get('fork_ratio')}×top-1 and ≥ {th.get('fork_second')}, "
        f"nucleus ≤ {th.get('fork_nucleus')}, tail ≤ {th.get('fork_tail')}; diffuse = tail ≥ "
        f"{th.get('diffuse_tail')}; mixed = the rest. Locks are strict (same top-1 under {b}) or swap; "
        f"self-correction = a lock after one of {list(o.get('self_correction', []))} (overlaps both). "
        f"Sampling transform of the truncated view: {tr}.",
        "",
    ]


def _significance_intro(summary: dict) -> list[str]:
    b = summary["bootstrap"]
    return [
        f"Intervals: {b['level']:.0%} percentile bootstrap over carrier {b['unit']}s ({b['n_boot']} resamples, "
        f"{b['n_units']} units, resampled within each carrier; positions of one sequence are not independent, "
        "so positions are never resampled on their own); for *all carriers* pooled, prompts are resampled with "
        f"every carrier's rows of them ({b['n_prompts']} prompts: p1's samples share p0's seeds and prefixes). "
        "`*` = the interval excludes 0; sign test p = two-sided binomial test on the signs of the units' own "
        "means. `rows` = units (carrier rows, or prompts when pooled) holding the positions.",
        "",
    ]


def markdown_lines(
    res: TokenComparison,
    names: tuple[str, str] = ("A", "B"),
    n_interesting: int = 10,
    plots: list[str] | None = None,
    summary: dict | None = None,
) -> list[str]:
    """summary.md lines: the probing table; per carrier the category, stratum, transition and
    decile tables; the token-text tables; examples; plots. ``summary``
    (:func:`~isdelta.tokens.compare.summarise`) adds the intervals, strata and probing tables."""
    out = ["## Token-level diagnostics: where the distribution moved", ""] + _intro(res, names)
    if summary is not None:
        out += _significance_intro(summary)
        out += [f"### Probing questions (full distribution; deltas {names[1]} − {names[0]})", ""]
        out += probing_table(summary["probing"]) + [""]
    tr = res.options.get("transform", {})
    identity = tr.get("temperature", 1.0) == 1.0 and not tr.get("top_k") and tr.get("top_p", 1.0) >= 1.0
    for c in res.carriers:
        h = res.headline(c)
        d = summary["carriers"][c] if summary is not None else {}
        out += [
            f"### {c} ({h['n']} positions)",
            "",
            f"Mean entropy {names[0]} {_f(h['a_entropy'], '.4f')} → {names[1]} {_f(h['b_entropy'], '.4f')} "
            f"nats (Δ {_f(h['entropy_delta'], '+g')}); mean KL({names[0]}‖{names[1]}) {_f(h['kl_ab'], 'g')}, "
            f"KL({names[1]}‖{names[0]}) {_f(h['kl_ba'], 'g')}; mean top-1 Δ {_f(h['top1_delta'], '+g')}; "
            f"top-1 token kept at {_f(h['top1_same'], '.1%')} of positions.",
            "",
        ]
        out += category_table(res, c, names, d.get("categories")) + [""]
        if not identity:
            out += ["After the sampling transform:", ""] + _trunc_table(res, c, names, d.get("categories")) + [""]
        if "strata" in d:
            out += ["By stratum (all positions of the stratum's rows):", ""] + strata_table(d["strata"], names) + [""]
        out += [f"Class transitions ({names[0]} → {names[1]}, same positions):", ""]
        out += _transition_table(res, c, names) + ["", "Entropy deciles with the commonest chosen tokens:", ""]
        out += _decile_table(res, c, names)
        out.append("")
    if summary is not None:
        held = [r for r in summary["probing_strata"] if r["n"]]
        out += [
            "### Probing questions by stratum",
            "",
            f"Strata holding positions of the group ({len(held)} lines; the rest are in tokens.json). Among many "
            "intervals about 1 in 20 excludes 0 by chance alone: read a lone `*` with that in mind.",
            "",
        ]
        out += probing_table(held) + [""]
        out += ["### Mean entropy by token text (all carriers)", ""]
        out += token_text_tables(summary["token_texts"], names)
    out += _examples(res, names, n_interesting)
    if plots:
        out += [f"![{p}]({p})" for p in plots]
    return out
