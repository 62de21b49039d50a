"""The run's outputs: report.json, sequences.csv, summary.md and PNG plots.

Everything here reads plain arrays (the engine's ``SequenceScores.to_numpy()`` dicts) and the
estimator's results (``EntropyDelta`` with the weights it used, per-prompt estimates,
``TokenDelta``); nothing is estimated again. matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from isdelta.outputs import atomic_write, versions
from isdelta.run.bounds import Shown, na
from isdelta.run.sequences import write_sequences_csv

__all__ = [
    "gap_lines",
    "headline",
    "headline_lines",
    "per_prompt_rows",
    "summary_markdown",
    "terminal_summary",
    "write_refused",
    "write_report",
]

LN2 = math.log(2.0)


def per_prompt_rows(per_prompt: dict, shown: Shown | None = None) -> list[dict]:
    """The per-prompt table of report.json (and the plot) from ``estimate_per_prompt``'s results;
    a prompt whose ΔH is outside the physical bounds gets ``delta: None`` and the reason."""
    rows = []
    for p, r in per_prompt.items():
        row = {"prompt": int(p), "delta": r.delta.to_dict(), "delta_tok": r.delta_tok.to_dict(), "ess": r.ess}
        why = None
        if shown is not None:
            why = shown.reason("h1", r.h1.value, "") or shown.reason("delta", r.delta.value, "", h0=r.h0.value)
        if why:
            row.update(delta=None, delta_tok=None, not_shown=why)
        rows.append({**row, "n": r.n_rows})
    return rows


_SNIS_ROWS = [
    ("H(p0) per sequence", "h0"),
    ("H(p1) per sequence", "h1"),
    ("**ΔH per sequence**", "delta"),
    ("H(p0) per token", "h0_tok"),
    ("H(p1) per token", "h1_tok"),
    ("**ΔH per token**", "delta_tok"),
    ("ΔH, Rao–Blackwellised", "delta_rb"),
    ("ΔH per token, Rao–Blackwellised", "delta_tok_rb"),
    ("ΔH₁ (first order)", "delta1"),
]
_TOKEN_ROWS = [
    ("**ΔH per sequence**", "delta"),
    ("**ΔH per token**", "delta_tok"),
    ("H(p1) per sequence", "h1"),
    ("ΔH on p0's own paths", "direct"),
    ("ΔH from path shift", "path_shift"),
]
_HEAD = ["quantity", "nats", "± SE", "CI (nats)", "bits", "CI (bits)"]


def _h0_for(res, key: str) -> float | None:
    """H(p0) in the unit of ``key`` (per sequence or per token), for ΔH's lower bound."""
    name = "h0_tok" if "_tok" in key else "h0"
    e = getattr(res, name, None)
    return None if e is None else e.value


def _estimate_rows(res, names, shown: Shown, method: str, h0_source=None) -> list[list[str]]:
    """[label, nats, se, CI, bits, CI bits] per estimate; ``n/a (reason)`` where not shown."""
    rows = []
    for label, key in names:
        e = getattr(res, key, None)
        if e is None:
            continue
        why = shown.reason(key, e.value, method, h0=_h0_for(h0_source or res, key))
        if why:
            rows.append([label, na(why), "", "", "", ""])
            continue
        b = e.bits
        rows.append(
            [
                label,
                f"{e.value:+.4f}",
                f"{e.se:.4f}",
                f"[{e.ci_low:+.4f}, {e.ci_high:+.4f}]",
                f"{b.value:+.4f}",
                f"[{b.ci_low:+.4f}, {b.ci_high:+.4f}]",
            ]
        )
    return rows


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The same rows, padded for a terminal (markdown emphasis dropped); an ``n/a (reason)`` row
    runs across the value columns without widening them."""
    rows = [[c.replace("**", "") for c in r] for r in [head, *rows]]
    sized = [r for r in rows if not r[1].startswith("n/a (") or len(r) == 2]
    widths = [max(len(r[i]) for r in (rows if i == 0 else sized)) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _snis_method(res) -> str:
    return "snis_rb" if res.delta_rb is not None else "snis"


def _diagnostics_rows(res, shown: Shown) -> list[list[str]]:
    khat = f"{res.khat:.3f} ({res.khat_threshold:.2f}) — {res.khat_status}"
    if not math.isfinite(res.khat):
        khat = na(f"{res.khat_status}: the tail fit needs ≥ 25 rows with distinct log-ratios")
    s_min = f"{res.s_min:.3g}" if math.isfinite(res.s_min) else na("k̂ not estimable, or ≥ 1")
    kl_why = shown.kl(res.kl)
    d = [
        ("ESS (pooled)", f"{res.ess:.1f} of {res.n_rows} ({res.ess_frac:.0%})"),
        ("ESS per prompt (min / mean)", f"{res.ess_min:.1f} / {res.ess_mean:.1f}"),
        ("Pareto k̂ (threshold)", khat),
        ("S_min for this k̂", s_min),
        ("KL(p1‖p0), nats", na(kl_why) if kl_why else f"{res.kl:.4g}"),
        ("mean ratio per prompt (min / max)", f"{res.mean_ratio_min:.3g} / {res.mean_ratio_max:.3g}"),
        ("weights", res.weights_used),
        ("uncertainty", f"prompts = {res.prompts}"),
        ("first-order gap terms (cov, KL)", f"{res.cov_term:+.4f}, {res.kl_term:+.4f}"),
    ]
    return [[k, v] for k, v in d]


def _sanity_rows(res, shown: Shown) -> list[list[str]]:
    why1 = shown.method_reason(_snis_method(res)) or ("negative" if res.nll1_tok < 0 else None)
    nll1 = na(why1) if why1 else f"{res.nll1_tok:.4f} nats = {res.nll1_tok / LN2:.4f} bits"
    d = [
        ("prompts × samples", f"{res.n_prompts} prompts, {res.n_rows} rows"),
        ("mean generated length (tokens)", f"{res.mean_length:.1f}"),
        ("per-token NLL under p0", f"{res.nll0_tok:.4f} nats = {res.nll0_tok / LN2:.4f} bits"),
        ("per-token NLL under p1 (SNIS)", nll1),
        ("rows without a stop token", "n/a" if res.no_stop_frac is None else f"{res.no_stop_frac:.0%}"),
        ("rows with L = 0", str(res.n_empty)),
    ]
    return [[k, v] for k, v in d]


def se_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 and math.isfinite(a / b) else "n/a (zero or non-finite SE)"


def _token_section(tok, res, shown: Shown) -> list[str]:
    """Per-decision (variance-reduced) estimates beside the sequence-level SNIS ones."""
    out = [
        "",
        f"## Per-decision estimates (variance-reduced, method `{tok.method}`)",
        "",
        "Each position's entropy weighted by its prefix ratio, exact next-token entropies, and a "
        "control variate (see `estimate_tokens`). Same samples as above.",
        "",
    ]
    out += markdown_table(_HEAD, _estimate_rows(tok, _TOKEN_ROWS, shown, tok.method, h0_source=tok))
    hidden = shown.method_reason(tok.method) or shown.method_reason(_snis_method(res))
    ratio = (
        na(hidden)
        if hidden
        else f"ΔH {se_ratio(tok.delta.se, res.delta.se)}, ΔH per token {se_ratio(tok.delta_tok.se, res.delta_tok.se)}"
    )
    out += [
        "",
        f"- control variate: {tok.beta}",
        f"- SE relative to sequence-level SNIS: {ratio}",
        f"- prefix ESS min {tok.prefix_ess_min:.1f} ({tok.prefix_ess_frac_min:.0%} of G), "
        f"max |log ρ| {tok.max_log_rho:.3g}",
    ]
    out += [f"- warning: {w}" for w in tok.warnings]
    return out


def gap_lines(gap, res, markdown: bool = True) -> list[str]:
    """The sampler–scorer gap (a sampler q ≠ p0, e.g. vLLM) as a table (markdown, or padded for a
    terminal), the p0/q weights' diagnostics (``res.proposal``) and the gap's warning; [] without q."""
    if gap is None:
        return []
    rows = [
        ["mean / max abs(log q − log p0) per token, nats", f"{gap.mean_abs:.3g} / {gap.max_abs:.3g}"],
        [f"tokens beyond {gap.tol:g} nats", f"{gap.frac_over:.2%} of {gap.n_tokens}"],
        ["ESS / S of p0/q (pooled; per prompt min)", f"{gap.ess_frac:.3f}; {gap.ess_frac_min:.3f}"],
        ["p0/q weights of the estimate", str(res.proposal)],
    ]
    intro = "The samples come from a sampler q, not p0: H0 is weighted by p0/q and H1 by p1/q (DESIGN §5)."
    table = (markdown_table if markdown else text_table)(["figure", "value"], rows)
    out = ["", "## Sampler–scorer gap" if markdown else "sampler–scorer gap:", "", intro, ""] + table
    return out + ([f"{'- ' if markdown else ''}warning: {gap.warning}"] if gap.warning else [])


def headline(res, decision) -> dict:
    """The run's answer for report.json: the headline policy's verdict (method, why, or why not
    and what would help) with its estimates, and sequence-level SNIS beside it."""
    return {
        **decision.to_dict(),
        "delta_snis": res.delta.to_dict(),
        "delta_tok_snis": res.delta_tok.to_dict(),
        "weights": res.weights_used,
    }


def _snis_beside(res, shown: Shown | None) -> str:
    """Sequence-level SNIS's ΔH for the second headline line, or why it is not shown."""
    if shown is not None:
        why = shown.reason("delta", res.delta.value, _snis_method(res), h0=res.h0.value)
        why = why or shown.reason("delta_tok", res.delta_tok.value, _snis_method(res), h0=res.h0_tok.value)
        if why:
            return f"ΔH {na(why)} (its raw numbers are in report.json, for inspection only)"
    return f"ΔH {res.delta}; per token {res.delta_tok}"


def headline_lines(res, decision, shown: Shown | None = None) -> list[str]:
    """Two lines for the terminal and summary.md: the headline (or plainly that there is no valid
    one, why, and what would make it readable), and sequence-level SNIS beside it (or, when the
    policy rejected it too, why its numbers are not shown)."""
    if decision.valid_tok and not decision.valid:  # long completions: the per-token rate alone holds
        return [
            f"ΔH per token = {decision.delta_tok} — {decision.method} ({decision.why})",
            f"ΔH per sequence: not valid on these samples — {decision.reason} {decision.advice}",
        ]
    if not decision.valid:
        return [
            f"ΔH: not valid on these samples — {decision.reason}",
            f"{decision.advice} Sequence-level SNIS: {_snis_beside(res, shown)}",
        ]
    best, best_tok = decision.delta, decision.delta_tok
    beside = _snis_beside(res, shown)
    same = decision.method != "snis" and not beside.startswith("ΔH n/a")
    return [
        f"ΔH = {best} per sequence ({best.bits.value:+.4g} bits); per token {best_tok} — {decision.method} "
        f"({decision.why})",
        f"sequence-level SNIS beside it: {beside}" + (f" (SE ratio {se_ratio(best.se, res.delta.se)})" if same else ""),
    ]


def terminal_summary(res, shown: Shown, tok=None) -> str:
    """The estimates and diagnostics for the terminal, with the same n/a rules as summary.md."""
    out = [f"sequence-level SNIS ({res.n_rows} rows, {res.n_prompts} prompts):"]
    out += text_table(_HEAD, _estimate_rows(res, _SNIS_ROWS, shown, _snis_method(res)))
    if tok is not None:
        out += ["", f"per-decision ({tok.method}):"]
        out += text_table(_HEAD, _estimate_rows(tok, _TOKEN_ROWS, shown, tok.method, h0_source=tok))
    out += [""] + text_table(["diagnostic", "value"], _diagnostics_rows(res, shown))
    out += [f"warning: {w}" for w in res.warnings]
    return "\n".join(out)


def summary_markdown(res, meta: dict[str, Any], decision, tok=None, shown: Shown | None = None, gap=None) -> str:
    """summary.md: headline, estimates, diagnostics, sanity figures, update, warnings, timings."""
    shown = shown or Shown(math.inf, 1)
    out = [
        f"# isdelta run — {meta.get('name', '')}",
        "",
        f"p0: `{meta['p0']}`; p1: {meta['p1']}. Entropies of the sampling distribution "
        f"({meta['transform']}), nats (bits = nats / ln 2). A figure the headline policy rejects, or "
        "one outside the physical bounds of entropy, is printed as n/a (reason).",
        "",
    ]
    best, beside = headline_lines(res, decision, shown)
    out += [f"**{best}**", "", beside]
    out += ["", "## Estimates (sequence-level SNIS)", ""]
    out += markdown_table(_HEAD, _estimate_rows(res, _SNIS_ROWS, shown, _snis_method(res)))
    if tok is not None:
        out += _token_section(tok, res, shown)
    out += ["", "## Diagnostics", ""] + markdown_table(["diagnostic", "value"], _diagnostics_rows(res, shown))
    out += ["", "## Sanity figures", ""] + markdown_table(["sanity figure", "value"], _sanity_rows(res, shown))
    out += gap_lines(gap, res)
    out += _update_lines(meta)
    if meta.get("probe"):
        out += ["", "## Probe: first-order prediction vs the true ΔH", ""] + list(meta["probe"].get("markdown", []))
    if meta.get("tokens"):
        out += [""] + list(meta["tokens"].get("markdown", []))
    out += ["", "## Warnings", ""]
    out += [f"- {w}" for w in res.warnings] or ["- none"]
    out += [f"- not in this report: {p}" for p in meta.get("problems", [])]
    out += _timing_lines(meta)
    if meta.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in meta["plots"]]
    return "\n".join(out) + "\n"


def write_report(
    out: Path,
    res,
    s0: dict,
    s1: dict,
    texts: list[str],
    meta: dict[str, Any],
    per_prompt: dict,
    decision,
    tok=None,
    plots: bool = True,
    n_trace: int = 4,
    shown: Shown | None = None,
    gap=None,
    problems: list[str] | None = None,
) -> dict:
    """Write report.json, sequences.csv, summary.md and (optionally) plots; return report dict.

    ``res`` is the sequence-level estimate (with the weights it used), ``per_prompt`` the
    estimates within each prompt (``estimate_per_prompt``), ``decision`` the headline policy's
    verdict (:func:`isdelta.estimators.headline`) and ``tok`` the per-decision estimate
    (``estimate_tokens``), shown beside sequence-level SNIS. ``shown`` says which figures the
    reports print as ``n/a (reason)``; report.json keeps every raw value and lists those under
    ``not_shown``. ``gap`` (:func:`isdelta.estimators.sampler_gap`, samples from a sampler q ≠ p0)
    adds the sampler–scorer gap (report.json ``sampler_gap``, None without q). ``problems``: parts
    of the report that could not be made, and why (report.json ``problems``, summary.md); plots
    that fail are added to them rather than costing the report.
    """
    out = Path(out)
    shown = shown or Shown(math.inf, 1)
    problems = list(problems or [])
    per_prompt = per_prompt_rows(per_prompt, shown)
    plot_files = []
    if plots:
        from isdelta.run.plots import draw_all

        try:
            plot_files = draw_all(out, res, s0, s1, per_prompt, n_trace)
        except Exception as e:  # a figure never costs the numbers: the report is written without it
            problems.append(f"the plots could not be drawn ({type(e).__name__}: {str(e)[:200]})")
    for p in problems:
        print(f"[isdelta] warning: {p}", file=sys.stderr, flush=True)
    meta = dict(meta, plots=plot_files, problems=problems)
    report = {
        **_provenance(meta),
        "headline": headline(res, decision),
        "estimate": res.to_dict(),
        "estimate_tokens": None if tok is None else tok.to_dict(),
        "probe": meta.get("probe"),
        "tokens": None if not meta.get("tokens") else {k: v for k, v in meta["tokens"].items() if k != "markdown"},
        "per_prompt": per_prompt,
        "not_shown": not_shown(res, tok, shown),
        "sampler_gap": None if gap is None else gap.to_dict(),
        "plots": plot_files,
        "problems": problems,
    }
    atomic_write(out / "report.json", json.dumps(report, indent=2, allow_nan=False, default=str))
    write_sequences_csv(out / "sequences.csv", s0, s1, texts, res.weights)
    atomic_write(out / "summary.md", summary_markdown(res, meta, decision, tok, shown, gap))
    return report


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """What report.json says of where its numbers come from, before the numbers."""
    keys = ("config", "config_hash", "data_hash", "identity", "device", "timings", "update", "transform")
    return {**{k: meta.get(k) for k in keys}, "versions": versions()}


def write_refused(out: Path, meta: dict[str, Any], reason: str, advice: str) -> dict:
    """report.json and summary.md of a run whose scores the estimators refuse: the headline is
    not valid, with the reason and what would help; no estimate. Returns the report dict."""
    out = Path(out)
    refused = {"valid": False, "method": "none", "reason": reason, "advice": advice}
    report = {
        **_provenance(meta),
        "headline": refused,
        "estimate": None,
        "estimate_tokens": None,
        "probe": meta.get("probe"),
        "problems": [reason],
    }
    atomic_write(out / "report.json", json.dumps(report, indent=2, allow_nan=False, default=str))
    lines = [f"# isdelta run — {meta.get('name', '')}", "", f"p0: `{meta['p0']}`; p1: {meta['p1']}.", ""]
    lines += [f"**ΔH: not valid — {reason}**", "", advice]
    lines += _update_lines(meta) + _timing_lines(meta)
    atomic_write(out / "summary.md", "\n".join(lines) + "\n")
    for stale in ("sequences.csv", *(p.name for p in out.glob("*.png"))):  # an earlier report's
        (out / stale).unlink(missing_ok=True)
    return report


def _update_lines(meta: dict[str, Any]) -> list[str]:
    if not meta.get("update"):
        return []
    u = meta["update"]
    return ["", "## Update", "", "| field | value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in u.items() if not isinstance(v, (list, dict))
    ]


def _timing_lines(meta: dict[str, Any]) -> list[str]:
    return ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"] + [
        f"| {k} | {v:.1f} |" for k, v in meta.get("timings", {}).items()
    ]


def not_shown(res, tok, shown: Shown) -> dict[str, str]:
    """``"estimate.delta"``-style keys of report.json -> why the reports print n/a for them."""
    out = {}
    for prefix, result, names, method in (
        ("estimate", res, _SNIS_ROWS, _snis_method(res)),
        ("estimate_tokens", tok, _TOKEN_ROWS, None if tok is None else tok.method),
    ):
        for _, key in names if result is not None else []:
            e = getattr(result, key, None)
            h0 = _h0_for(result, key)
            if e is not None and (why := shown.reason(key, e.value, method, h0=h0)):
                out[f"{prefix}.{key}"] = why
    if why := shown.kl(res.kl):
        out["estimate.kl"] = why
    return out
