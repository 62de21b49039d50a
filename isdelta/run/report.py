"""The run's outputs: report.json, sequences.csv, summary.md and PNG plots.

Everything here reads plain arrays (the engine's ``SequenceScores.to_numpy()`` dicts) and the
estimator's results (``EntropyDelta`` with the weights it used, per-prompt estimates,
``TokenDelta``); nothing is estimated again. matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from isdelta.outputs import atomic_write, versions

__all__ = ["headline", "headline_lines", "per_prompt_rows", "summary_markdown", "write_report"]

LN2 = math.log(2.0)


def per_prompt_rows(per_prompt: dict) -> list[dict]:
    """The per-prompt table of report.json (and the plot) from ``estimate_per_prompt``'s results."""
    return [
        {"prompt": int(p), "delta": r.delta.to_dict(), "delta_tok": r.delta_tok.to_dict(), "ess": r.ess, "n": r.n_rows}
        for p, r in per_prompt.items()
    ]


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if isinstance(x, float) else str(x)


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


def _estimate_table(res, names: list[tuple[str, str]] | None = None) -> list[str]:
    lines = ["| quantity | nats | ± SE | CI (nats) | bits | CI (bits) |", "|---|---|---|---|---|---|"]
    names = names or _SNIS_ROWS
    for label, key in names:
        e = getattr(res, key, None)
        if e is None:
            continue
        b = e.bits
        lines.append(
            f"| {label} | {e.value:+.4f} | {e.se:.4f} | [{e.ci_low:+.4f}, {e.ci_high:+.4f}] | "
            f"{b.value:+.4f} | [{b.ci_low:+.4f}, {b.ci_high:+.4f}] |"
        )
    return lines


def _diagnostics_table(res) -> list[str]:
    d = [
        ("ESS (pooled)", f"{res.ess:.1f} of {res.n_rows} ({res.ess_frac:.0%})"),
        ("ESS per prompt (min / mean)", f"{res.ess_min:.1f} / {res.ess_mean:.1f}"),
        ("Pareto k̂ (threshold)", f"{res.khat:.3f} ({res.khat_threshold:.2f}) — {res.khat_status}"),
        ("S_min for this k̂", f"{res.s_min:.3g}"),
        ("KL(p1‖p0), nats", f"{res.kl:.4g}"),
        ("mean ratio per prompt (min / max)", f"{res.mean_ratio_min:.3f} / {res.mean_ratio_max:.3f}"),
        ("weights", res.weights_used),
        ("uncertainty", f"prompts = {res.prompts}"),
        ("first-order gap terms (cov, KL)", f"{res.cov_term:+.4f}, {res.kl_term:+.4f}"),
    ]
    return ["| diagnostic | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d]


def _sanity_table(res) -> list[str]:
    d = [
        ("prompts × samples", f"{res.n_prompts} prompts, {res.n_rows} rows"),
        ("mean generated length (tokens)", f"{res.mean_length:.1f}"),
        ("per-token NLL under p0", f"{res.nll0_tok:.4f} nats = {res.nll0_tok / LN2:.4f} bits"),
        ("per-token NLL under p1 (SNIS)", f"{res.nll1_tok:.4f} nats = {res.nll1_tok / LN2:.4f} bits"),
        ("rows without a stop token", "n/a" if res.no_stop_frac is None else f"{res.no_stop_frac:.0%}"),
        ("rows with L = 0", str(res.n_empty)),
    ]
    return ["| sanity figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d]


def se_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a (zero SE)"


def _token_section(tok, res) -> list[str]:
    """Per-decision (variance-reduced) estimates beside the sequence-level SNIS ones."""
    out = [
        "",
        f"## Per-decision estimates (variance-reduced, method `{tok.method}`)",
        "",
        "Each position's entropy weighted by its prefix ratio, exact next-token entropies, and a "
        "control variate (see `estimate_tokens`). Same samples as above.",
        "",
    ]
    out += _estimate_table(
        tok,
        [
            ("**ΔH per sequence**", "delta"),
            ("**ΔH per token**", "delta_tok"),
            ("H(p1) per sequence", "h1"),
            ("ΔH on p0's own paths", "direct"),
            ("ΔH from path shift", "path_shift"),
        ],
    )
    out += [
        "",
        f"- control variate: {tok.beta}",
        f"- SE relative to sequence-level SNIS: ΔH {se_ratio(tok.delta.se, res.delta.se)}, "
        f"ΔH per token {se_ratio(tok.delta_tok.se, res.delta_tok.se)}",
        f"- prefix ESS min {tok.prefix_ess_min:.1f} ({tok.prefix_ess_frac_min:.0%} of G), "
        f"max |log ρ| {tok.max_log_rho:.3g}",
    ]
    out += [f"- warning: {w}" for w in tok.warnings]
    return out


def headline(res, decision) -> dict:
    """The run's answer for report.json: the headline policy's verdict (method, why, or why not
    and what would help) with its estimates, and sequence-level SNIS beside it."""
    return {
        **decision.to_dict(),
        "delta_snis": res.delta.to_dict(),
        "delta_tok_snis": res.delta_tok.to_dict(),
        "weights": res.weights_used,
    }


def headline_lines(res, decision) -> list[str]:
    """Two lines for the terminal and summary.md: the headline (or plainly that there is no valid
    one, why, and what would make it readable), and sequence-level SNIS beside it."""
    if not decision.valid:
        return [
            f"ΔH: not valid on these samples — {decision.reason}",
            f"{decision.advice} Sequence-level SNIS, for inspection only: ΔH {res.delta}; per token {res.delta_tok}",
        ]
    best, best_tok = decision.delta, decision.delta_tok
    return [
        f"ΔH = {best} per sequence ({best.bits.value:+.4g} bits); per token {best_tok} — {decision.method} "
        f"({decision.why})",
        f"sequence-level SNIS beside it: ΔH {res.delta}; per token {res.delta_tok}"
        + (f" (SE ratio {se_ratio(best.se, res.delta.se)})" if decision.method != "snis" else ""),
    ]


def summary_markdown(res, meta: dict[str, Any], decision, tok=None) -> str:
    """summary.md: headline, estimates, diagnostics, sanity figures, update, warnings, timings."""
    out = [
        f"# isdelta run — {meta.get('name', '')}",
        "",
        f"p0: `{meta['p0']}`; p1: {meta['p1']}. Entropies of the sampling distribution "
        f"({meta['transform']}), nats (bits = nats / ln 2).",
        "",
    ]
    best, beside = headline_lines(res, decision)
    out += [f"**{best}**", "", beside]
    out += ["", "## Estimates (sequence-level SNIS)", ""]
    out += _estimate_table(res)
    if tok is not None:
        out += _token_section(tok, res)
    out += ["", "## Diagnostics", ""] + _diagnostics_table(res)
    out += ["", "## Sanity figures", ""] + _sanity_table(res)
    if meta.get("update"):
        u = meta["update"]
        out += ["", "## Update", "", "| field | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in u.items() if not isinstance(v, (list, dict))]
    if meta.get("probe"):
        out += ["", "## Probe: first-order prediction vs the true ΔH", ""] + list(meta["probe"].get("markdown", []))
    if meta.get("tokens"):
        out += [""] + list(meta["tokens"].get("markdown", []))
    out += ["", "## Warnings", ""]
    out += [f"- {w}" for w in res.warnings] or ["- none"]
    out += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in meta.get("timings", {}).items()]
    if meta.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in meta["plots"]]
    return "\n".join(out) + "\n"


def write_sequences_csv(path: Path, s0: dict, s1: dict, texts: list[str], weights) -> None:
    """One row per sample: ids, length, stop, S0, S1, log-ratio, weights (raw and the ones the
    estimate used), entropy sums, text."""
    log_r = s1["logp"] - s0["logp"]
    w, used = weights.w_raw, weights.w
    group = s0["group"]
    sample_id = np.zeros(len(group), dtype=int)
    for p in np.unique(group):
        sample_id[group == p] = np.arange((group == p).sum())

    def write(f) -> None:
        wr = csv.writer(f)
        wr.writerow(
            [
                "prompt_id",
                "sample_id",
                "length",
                "stopped",
                "S0",
                "S1",
                "log_ratio",
                "weight",
                "weight_smoothed",
                "entropy_sum0",
                "entropy_sum1",
                "text",
            ]
        )
        for i in range(len(group)):
            wr.writerow(
                [
                    int(group[i]),
                    int(sample_id[i]),
                    int(s0["length"][i]),
                    bool(s0["stopped"][i]),
                    f"{s0['logp'][i]:.6f}",
                    f"{s1['logp'][i]:.6f}",
                    f"{log_r[i]:.6g}",
                    f"{w[i]:.6g}",
                    f"{used[i]:.6g}",
                    f"{s0['entropy_sum'][i]:.6f}",
                    f"{s1['entropy_sum'][i]:.6f}",
                    texts[i],
                ]
            )

    atomic_write(path, write, text=True)


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
) -> dict:
    """Write report.json, sequences.csv, summary.md and (optionally) plots; return report dict.

    ``res`` is the sequence-level estimate (with the weights it used), ``per_prompt`` the
    estimates within each prompt (``estimate_per_prompt``), ``decision`` the headline policy's
    verdict (:func:`isdelta.estimators.headline`) and ``tok`` the per-decision estimate
    (``estimate_tokens``), shown beside sequence-level SNIS.
    """
    out = Path(out)
    per_prompt = per_prompt_rows(per_prompt)
    plot_files = []
    if plots:
        from isdelta.run.plots import draw_all

        plot_files = draw_all(out, res, s0, s1, per_prompt, n_trace)
    meta = dict(meta, plots=plot_files)
    report = {
        "config": meta.get("config"),
        "config_hash": meta.get("config_hash"),
        "versions": versions(),
        "device": meta.get("device"),
        "timings": meta.get("timings"),
        "update": meta.get("update"),
        "transform": meta.get("transform"),
        "headline": headline(res, decision),
        "estimate": res.to_dict(),
        "estimate_tokens": None if tok is None else tok.to_dict(),
        "probe": meta.get("probe"),
        "tokens": None if not meta.get("tokens") else {k: v for k, v in meta["tokens"].items() if k != "markdown"},
        "per_prompt": per_prompt,
        "plots": plot_files,
    }
    atomic_write(out / "report.json", json.dumps(report, indent=2, allow_nan=False, default=str))
    write_sequences_csv(out / "sequences.csv", s0, s1, texts, res.weights)
    atomic_write(out / "summary.md", summary_markdown(res, meta, decision, tok))
    return report
