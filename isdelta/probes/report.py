"""The probe's comparison report: ΔH₁ against the importance-sampled ΔH, tables and plots.

Per step α of a sweep: the SNIS truth ΔH ± CI (per sequence and per token), the function-space
ΔH₁ (−Cov_p0(S0, δ_α)) and the gradient ΔH₁·α, their relative error and sign agreement, the
exact split of the gap ΔĤ − ΔH₁ into the SNIS sample-size bias (−ΔH₁/G: self-normalised
weights shrink ΔĤ towards 0 by a factor (G − 1)/G at first order), the weights' higher-order
terms and the KL term ≈ −KL(p_α‖p0) (:func:`~isdelta.probes.sweep.gap_terms`), and ESS and k̂ (where
the truth itself stops being trustworthy). The same per prompt at one α. The plots are in
:mod:`isdelta.probes.plots` (matplotlib, imported only when they are drawn).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write, finite_or_none
from isdelta.probes.sweep import SweepResult, gap_terms, per_prompt_points

__all__ = ["comparison_rows", "markdown_lines", "probe_report", "run_probe"]


# ---------------------------------------------------------------------------- numbers
def _rel(pred: float | None, truth: float) -> float | None:
    """(pred − truth)/|truth|; None when either is missing or the truth is 0."""
    if pred is None or truth == 0 or not (math.isfinite(pred) and math.isfinite(truth)):
        return None
    return (pred - truth) / abs(truth)


def _sign(pred: float | None, truth: float) -> bool | None:
    if pred is None or truth == 0 or not (math.isfinite(pred) and math.isfinite(truth)):
        return None
    return bool(np.sign(pred) == np.sign(truth))


def _inside(pred: float | None, est) -> bool | None:
    return None if pred is None or not math.isfinite(pred) else bool(est.ci_low <= pred <= est.ci_high)


def comparison_rows(result: SweepResult) -> list[dict]:
    """One JSON-safe dict per α: truth, both ΔH₁, errors, signs, gap terms, ESS, k̂."""
    grad, grad_tok = result.delta1_grad(), result.delta1_grad(per_token=True)
    rows = []
    for a, (alpha, e) in enumerate(zip(result.alphas, result.estimates)):
        g = None if grad is None else float(grad[a])
        gt = None if grad_tok is None else float(grad_tok[a])
        fs, fs_tok, truth = e.delta1.value, result.delta1_tok_fs[a], e.delta.value
        rows.append(
            {
                "alpha": alpha,
                "delta": e.delta.to_dict(),
                "delta_tok": e.delta_tok.to_dict(),
                "delta1_fs": e.delta1.to_dict(),
                "delta1_tok_fs": finite_or_none(fs_tok),
                "delta1_grad": finite_or_none(g),
                "delta1_grad_tok": finite_or_none(gt),
                "rel_err_fs": _rel(fs, truth),
                "rel_err_grad": _rel(g, truth),
                "rel_err_tok_fs": _rel(fs_tok, e.delta_tok.value),
                "rel_err_tok_grad": _rel(gt, e.delta_tok.value),
                "sign_fs": _sign(fs, truth),
                "sign_grad": _sign(g, truth),
                "in_ci_fs": _inside(fs, e.delta),
                "in_ci_grad": _inside(g, e.delta),
                "cov_term": finite_or_none(e.cov_term),
                "kl_term": finite_or_none(e.kl_term),
                "kl": finite_or_none(e.kl),
                **{f"gap_{k}": finite_or_none(v) for k, v in gap_terms(result, a).items()},
                "ess": finite_or_none(e.ess),
                "ess_frac": finite_or_none(e.ess_frac),
                "khat": finite_or_none(e.khat),
                "khat_threshold": finite_or_none(e.khat_threshold),
                "khat_status": e.khat_status,
                "weights_used": e.weights_used,
            }
        )
    return rows


def _linear_until(rows: list[dict], key: str) -> float | None:
    """Largest α > 0 such that the prediction ``key`` lies in ΔH's CI at it and every smaller α."""
    last = None
    for r in rows:
        if r["alpha"] <= 0:
            continue
        if not r[key]:
            break
        last = r["alpha"]
    return last


def _reference_alpha(alphas: Sequence[float]) -> float:
    """α = 1 (the update itself) when swept, else the positive α closest to it in log scale."""
    positive = [a for a in alphas if a > 0]
    if 1.0 in alphas or not positive:
        return 1.0 if 1.0 in alphas else alphas[-1]
    return min(positive, key=lambda a: abs(math.log(a)))


def _per_prompt_summary(points: list[dict]) -> dict:
    """Sign agreement and relative error of ΔH₁_p (both spaces) against ΔH_p over prompts."""
    truth = np.array([p["delta"]["value"] for p in points], dtype=float)
    out: dict = {"n_prompts": len(points)}
    for name, get in (("fs", lambda p: p["delta1"]["value"]), ("grad", lambda p: p["delta1_grad"])):
        pred = [get(p) for p in points]
        if any(v is None for v in pred):
            continue
        pred = np.array(pred, dtype=float)
        signs = [s for s in (_sign(x, t) for x, t in zip(pred, truth)) if s is not None]
        rel = [r for r in (_rel(x, t) for x, t in zip(pred, truth)) if r is not None]
        corr = float(np.corrcoef(pred, truth)[0, 1]) if len(points) > 2 and pred.std() > 0 and truth.std() > 0 else None
        out[name] = {
            "sign_agreement": float(np.mean(signs)) if signs else None,
            "median_abs_rel_err": float(np.median(np.abs(rel))) if rel else None,
            "correlation": finite_or_none(corr) if corr is not None else None,
        }
    return out


# ---------------------------------------------------------------------------- report
def probe_report(
    result: SweepResult, out_dir: str | Path | None, *, plots: bool = True, alpha_ref: float | None = None
) -> dict:
    """The comparison as a JSON-safe dict; draws ``probe_sweep.png`` and ``probe_per_prompt.png``.

    Parameters
    ----------
    result : SweepResult
        From :func:`~isdelta.probes.step_sweep`.
    out_dir : path or None
        Folder for the PNGs (created); None draws nothing.
    plots : bool
        Draw the PNGs (needs matplotlib).
    alpha_ref : float, optional
        The step of the per-prompt comparison; default α = 1 (the update) or the nearest swept α.

    Returns
    -------
    dict
        ``sweep`` (SweepResult.to_dict()), ``rows`` (comparison per α), ``summary`` (k̂ crossing,
        the largest α where each ΔH₁ stays inside ΔH's CI), ``per_prompt`` (points and summary
        at ``alpha_ref``), ``plots`` (file names). Serialisable with ``allow_nan=False``.
    """
    rows = comparison_rows(result)
    alpha_ref = _reference_alpha(result.alphas) if alpha_ref is None else float(alpha_ref)
    points = per_prompt_points(result, alpha_ref)
    pp_summary = _per_prompt_summary(points)
    summary = {
        "khat_crossing": result.khat_crossing(),
        "khat_crossing_interp": result.khat_crossing_interp(),
        "linear_until_fs": _linear_until(rows, "in_ci_fs"),
        "linear_until_grad": _linear_until(rows, "in_ci_grad"),
        "include": result.include,
        "n_rows": result.estimates[0].n_rows,
        "n_prompts": result.estimates[0].n_prompts,
    }
    files: list[str] = []
    if plots and out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from isdelta.probes.plots import plot_per_prompt, plot_sweep

        plot_sweep(out / "probe_sweep.png", result)
        plot_per_prompt(out / "probe_per_prompt.png", points, alpha_ref, pp_summary)
        files = ["probe_sweep.png", "probe_per_prompt.png"]
    return {
        "sweep": result.to_dict(),
        "rows": rows,
        "summary": summary,
        "per_prompt": {"alpha": alpha_ref, "points": points, "summary": pp_summary},
        "plots": files,
    }


def _f(x, spec: str = "+.4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _table(rows: list[dict]) -> list[str]:
    head = (
        "| α | ΔH [CI] | ΔH₁ fn | ΔH₁ grad·α | rel. err fn / grad | sign fn / grad | gap: 1/G · nonlin · KL "
        "| ΔH/token [CI] | ΔH₁/token fn / grad·α | ESS/N | k̂ (thr) |"
    )
    lines = [head, "|" + "---|" * 12]
    mark = {True: "✓", False: "✗", None: "–"}
    for r in rows:
        d, t = r["delta"], r["delta_tok"]
        lines.append(
            f"| {r['alpha']:g} | {_f(d['value'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}] "
            f"| {_f(r['delta1_fs']['value'])} | {_f(r['delta1_grad'])} "
            f"| {_f(r['rel_err_fs'], '+.0%')} / {_f(r['rel_err_grad'], '+.0%')} "
            f"| {mark[r['sign_fs']]} / {mark[r['sign_grad']]} | {_f(r['gap_sample_size'])} · {_f(r['gap_nonlinear'])} · {_f(r['gap_kl'])} "
            f"| {_f(t['value'], '+.5f')} [{_f(t['ci_low'], '+.5f')}, {_f(t['ci_high'], '+.5f')}] "
            f"| {_f(r['delta1_tok_fs'], '+.5f')} / {_f(r['delta1_grad_tok'], '+.5f')} "
            f"| {_f(r['ess_frac'], '.2f')} | {_f(r['khat'], '.2f')} ({_f(r['khat_threshold'], '.2f')}) |"
        )
    return lines


def markdown_lines(report: Mapping) -> list[str]:
    """summary.md lines for a :func:`probe_report` dict: the table, verdicts, per prompt, plots."""
    s, g = report["summary"], report["sweep"]["gradient"]
    intro = (
        f"p_α = θ0 + α(θ1 − θ0), every α scored on the same {s['n_rows']} samples of p0 "
        f"({s['n_prompts']} prompts); nats; include = {s['include']}. ΔH − ΔH₁ fn = "
        "gap 1/G (SNIS normalises within G samples: ΔĤ ≈ (1 − 1/G)ΔH to first order) + nonlin (the "
        "weights beyond first order) + KL (≈ −KL(p_α‖p0)), exactly."
    )
    out = ["## Probe: first-order prediction ΔH₁ vs the sampled ΔH", "", intro, ""]
    if g is not None:
        d = g["delta1"]
        out += [
            f"Gradient ΔH₁ = ⟨∇H, θ1 − θ0⟩ = {_f(d['value'])} ± {_f(d['se'], '.4f')} nats/sequence "
            f"(between-prompt SE; ‖θ1 − θ0‖ = {_f(g['direction_norm'], '.4g')}, "
            f"{g['n_backward']} backward passes)"
            + (
                ""
                if g["delta1_tok"] is None
                else f"; per token {_f(g['delta1_tok']['value'], '+.5f')} ± {_f(g['delta1_tok']['se'], '.5f')}"
            )
            + ".",
            "",
        ]
    out += _table(report["rows"]) + [""]
    out.append(
        f"- k̂ first above its threshold at α = {_f(s['khat_crossing'], 'g')} "
        f"(interpolated {_f(s['khat_crossing_interp'], '.3g')}); from there the ΔH column is unreliable."
    )
    out.append(
        f"- ΔH₁ inside ΔH's CI at every α up to {_f(s['linear_until_fs'], 'g')} (function space), "
        f"{_f(s['linear_until_grad'], 'g')} (gradient): no detectable departure from first order there."
    )
    pp = report["per_prompt"]
    for name, label in (("fs", "function space"), ("grad", "gradient")):
        v = pp["summary"].get(name)
        if v:
            out.append(
                f"- per prompt at α = {pp['alpha']:g} ({label}): signs agree for "
                f"{_f(v['sign_agreement'], '.0%')} of {pp['summary']['n_prompts']} prompts, median "
                f"|rel. err| {_f(v['median_abs_rel_err'], '.0%')}, correlation {_f(v['correlation'], '.2f')}."
            )
    if report.get("plots"):
        out += [""] + [f"![{p}]({p})" for p in report["plots"]]
    return out


def run_probe(
    model0,
    direction,
    rollouts,
    scores0,
    *,
    alphas: Sequence[float],
    gradient: bool = True,
    engine_config=None,
    estimator_kw: Mapping | None = None,
    out_dir: str | Path | None = None,
    per_token: bool = True,
    plots: bool = True,
) -> dict:
    """Gradient probe + step sweep + comparison report, as the run pipeline calls it.

    ``model0`` must hold θ0 (it is moved in place and restored bit for bit); ``scores0`` are
    p0's whole-sequence scores of ``rollouts`` (EOS counted; None: scored here). Writes
    ``probe.json``, ``probe.md`` and the PNGs into ``out_dir`` (None: nothing written) and
    returns the :func:`probe_report` dict with ``timings`` and ``markdown`` (list of lines).
    """
    from isdelta.probes.gradient import gradient_delta
    from isdelta.probes.sweep import step_sweep

    timings, t0 = {}, time.perf_counter()
    g = None
    if gradient:
        g = gradient_delta(
            model0, rollouts, direction, per_token=per_token, engine_config=engine_config, scores0=scores0
        )
        timings["gradient"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sweep = step_sweep(
        model0,
        direction,
        rollouts,
        alphas,
        engine_config=engine_config,
        estimator_kw=estimator_kw,
        scores0=scores0,
        gradient=g,
    )
    timings["sweep"] = time.perf_counter() - t1
    report = probe_report(sweep, out_dir, plots=plots)
    report["timings"] = timings
    report["markdown"] = markdown_lines(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "probe.json", json.dumps(report, indent=2, allow_nan=False))
        atomic_write(out / "probe.md", "\n".join(report["markdown"]) + "\n")
    return report
