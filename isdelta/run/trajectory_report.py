"""A trajectory run's outputs: trajectory.csv, trajectory.md, trajectory.json and trajectory.png.

One row per checkpoint k = 0 (the base) … K, entropies in nats:

- ``kind``: ``base``, ``direct`` (estimated on the base's samples) or ``chained`` (the anchor
  h − 1 plus consecutive steps, each on the previous checkpoint's own samples); ``kind_tok``: the
  same for the per-token level (``direct`` at a horizon the base's samples still reach per token);
  ``samples_from``: whose samples the row's last segment used; ``horizon``: the IS horizon's row.
- ``valid``, ``valid_tok``: the row's two verdicts, per sequence and per token (each level is
  chained on its own; a level not valid leaves its columns empty, ``reason`` says why, naming
  the level when only one fails).
- ``h``, ``h_tok``: H(p_k) per sequence and per token; ``delta``, ``delta_tok``: ΔH from the base;
  each with ``_se``, ``_ci_low``, ``_ci_high`` (empty when that level is not valid).
- ``h_own``, ``h_own_se``, ``h_own_tok``, ``h_own_tok_se``: H(p_k) as a plain mean over
  checkpoint k's own samples (no importance weight), where it sampled (the base, and the
  sources of chained steps); ``own_z``, ``own_z_tok``: the own-sample check,
  z = |H − H_own| / √(SE² + SE_own²) per level (empty for the base, whose H is that mean, and
  where k did not sample); z above ``own_sample_z(level)`` made that level not valid.
- ``step_delta``, ``step_delta_se``: the row's own segment (direct: base → k; chained: k−1 → k).
- ``ess``, ``ess_frac``, ``khat``, ``kl``: that segment's sequence-level diagnostics;
  ``method``: the headline policy's choice for it; ``reason``.

The markdown table marks each level's verdict (``valid (seq / tok)``) and the own-sample z; the
plot greys, on each axis, the rows not valid at that axis's level.

Nothing is estimated here: the rows come from :func:`isdelta.run.trajectory_chain.chain`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from isdelta.outputs import atomic_write, versions
from isdelta.run.config import RunConfig, config_hash
from isdelta.run.trajectory_chain import UNITS, own_sample_z

__all__ = ["plot_trajectory", "point_rows", "trajectory_markdown", "write_trajectory"]


def _num(obj, attr: str) -> float | None:
    return _finite(None if obj is None else getattr(obj, attr))


def point_rows(points, cks, h: int | None) -> list[dict]:
    """The CSV's rows: one per checkpoint (the module docstring lists the columns)."""
    rows = []
    for p in points:
        ck, seg = cks[p.k], p.step
        row = {"k": p.k, "checkpoint": ck.name, "path": ck.model.path, "kind": p.kind, "kind_tok": p.kind_tok}
        row.update(samples_from="" if seg is None else cks[seg.source].name, horizon=p.k == h)
        row.update(valid=p.valid, valid_tok=p.valid_tok)
        for key in ("h", "h_tok", "delta", "delta_tok"):
            e = getattr(p, key)
            row.update({key: _num(e, "value"), f"{key}_se": _num(e, "se")})
            row.update({f"{key}_ci_low": _num(e, "ci_low"), f"{key}_ci_high": _num(e, "ci_high")})
        own_h, own_tok = (None, None) if p.own is None else p.own  # plain means: no weights
        row.update(h_own=_num(own_h, "value"), h_own_se=_num(own_h, "se"))
        row.update(h_own_tok=_num(own_tok, "value"), h_own_tok_se=_num(own_tok, "se"))
        row.update(own_z=_finite(p.own_z), own_z_tok=_finite(p.own_z_tok))
        d = None if seg is None or p.kind == "base" else seg.decision
        step = d.delta if d is not None and d.valid else None
        row.update(step_delta=_num(step, "value"), step_delta_se=_num(step, "se"))
        res = None if p.kind == "base" else seg.res
        row.update({k: _num(res, k) for k in ("ess", "ess_frac", "khat", "kl")})
        row.update(method="" if d is None else d.method, reason=p.reason or "")
        rows.append(row)
    return rows


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _pm(row: dict, key: str, sign: str = "") -> str:
    v, se = row[key], row[f"{key}_se"]
    return "—" if v is None else f"{v:{sign}.4f} ± {se:.4f}"


def _ci(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    return "—" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"


def _diag(row: dict) -> tuple[str, str]:
    ess = "—" if row["ess_frac"] is None else f"{row['ess_frac']:.0%}"
    khat = "—" if row["khat"] is None else f"{row['khat']:.2f}"
    return ess, khat


def _z(row: dict) -> str:
    zs = [row[key] for key in ("own_z", "own_z_tok")]
    return "—" if zs == [None, None] else " / ".join("—" if z is None else f"{z:.2f}" for z in zs)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def trajectory_markdown(rows: list[dict], h: int | None, level: float, direct_reason: str | None) -> list[str]:
    """The trajectory table and what it means (for trajectory.md and the terminal)."""
    ci = f"{level:.0%} CI"
    head = ["k", "checkpoint", "kind", "H (nats/seq)", "H on own samples", "z own (seq / tok)", "ΔH from base", ci]
    head += ["ΔH/token", ci, "ESS/S", "k̂", "method", "valid (seq / tok)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ess, khat = _diag(r)
        cells = [str(r["k"]), f"`{r['checkpoint']}`", r["kind"] + (" ◀ horizon" if r["horizon"] else "")]
        cells += [_pm(r, "h"), _pm(r, "h_own"), _z(r), _pm(r, "delta", "+"), _ci(r, "delta")]
        cells += [_pm(r, "delta_tok", "+"), _ci(r, "delta_tok")]
        cells += [ess, khat, r["method"] or "—", f"{_yes(r['valid'])} / {_yes(r['valid_tok'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    if h is None:
        lines += ["", "IS horizon: not reached — every checkpoint was estimated from the base's samples."]
    else:
        lines += [
            "",
            f"IS horizon: k = {h} (`{rows[h]['checkpoint']}`): the headline policy declared the estimate from the "
            f"base's samples not valid per sequence ({direct_reason}). From there on each step k−1 → k is estimated "
            f"on checkpoint k−1's own samples and chained from k = {h - 1}: H(k) = H({h - 1}) + Σ steps, "
            "SE = √(Σ SE²) (independent sample sets).",
        ]
        if rows[h]["kind_tok"] == "direct":
            lines[-1] += (
                f" Per token the base's samples still hold at k = {h}: its value is direct, chained from there."
            )
    z_max = own_sample_z(level)
    lines += [
        "",
        "Own-sample check: where a checkpoint sampled itself, its row's H (weighted or chained) is compared with the "
        f"plain mean over its own samples, z = |Δ| / √(SE² + SE_own²); z > {z_max:.2f} (Bonferroni over the two "
        f"levels at {level:.0%}) makes that level of the row, and of the chained rows built on it, not valid.",
    ]
    for r in rows:  # a reason that names its level reads on ("not valid per token: …")
        if not (r["valid"] and r["valid_tok"]):
            sep = " " if r["reason"].startswith(tuple(f"{u}: " for u in UNITS)) else " — "
            lines.append(f"- k = {r['k']}: not valid{sep}{r['reason']}")
    return lines


def write_trajectory(out: Path, cfg: RunConfig, cks, points, direct, h: int | None, meta: dict) -> dict:
    """Write trajectory.csv, trajectory.md, trajectory.json and (``output.plots``) trajectory.png;
    print the table; return the report dict."""
    rows = point_rows(points, cks, h)
    direct_reason = None if h is None else direct[h - 1].decision.reason

    def write_csv(f) -> None:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)

    atomic_write(out / "trajectory.csv", write_csv, text=True)
    table = trajectory_markdown(rows, h, cfg.estimator.level, direct_reason)
    plots = []
    if cfg.output.plots:
        plot_trajectory(out / "trajectory.png", rows, h)
        plots.append("trajectory.png")
    md = [
        f"# isdelta trajectory — {out.name}",
        "",
        f"Base `{cfg.model.path}` and {len(cks) - 1} checkpoints in training order; {cfg.sampling.num_samples} "
        f"samples per prompt of {meta['transform']}; entropies in nats (bits = nats / ln 2). Each ΔH is the "
        "headline policy's estimate (DESIGN.md §5.4); ESS/S, k̂ and method are those of the row's own segment.",
        "",
        *table,
        "",
        "## Time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in meta["timings"].items()],
    ]
    md += ["", *(f"![{p}]({p})" for p in plots)]
    atomic_write(out / "trajectory.md", "\n".join(md) + "\n")
    report = {
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "versions": versions(),
        **meta,
        "horizon": h,
        "rows": rows,
        "segments": [_segment_dict(s, cks) for s in _segments(points, direct)],
        "plots": plots,
    }
    atomic_write(out / "trajectory.json", json.dumps(report, indent=2, allow_nan=False, default=str))
    print("\n".join(table))
    print(f"\nreport: {out / 'trajectory.md'}  (trajectory.csv, trajectory.json, plots)")
    return report


def _segments(points, direct) -> list:
    """Every segment estimated (the direct ones, then the chained steps), each once."""
    segs = list(direct)
    segs += [p.step for p in points if p.kind == "chained" and all(p.step is not s for s in segs)]
    return segs


def _segment_dict(seg, cks) -> dict:
    return {
        "from": cks[seg.source].name,
        "to": cks[seg.target].name,
        "samples_of": cks[seg.source].name,
        "headline": seg.decision.to_dict(),
        "estimate": None if seg.res is None else seg.res.to_dict(),
    }


def plot_trajectory(path: Path, rows: list[dict], h: int | None) -> None:
    """H(p_k) against the checkpoint, per sequence and per token, with CI bands: the direct part
    (the base's samples) and the chained part (from its anchor on), the IS horizon marked, the
    own-sample means where a checkpoint sampled itself; each axis leaves out and greys the rows
    not valid at its level (the table says why)."""
    import numpy as np

    from isdelta.outputs import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, tok, unit in zip(axes, ("h", "h_tok"), ("", "_tok"), ("nats per sequence", "nats per token")):
        kinds, ok = [r[f"kind{tok}"] for r in rows], [r[f"valid{tok}"] for r in rows]
        for kind, color, style in (("direct", "C0", "o-"), ("chained", "C1", "s--")):
            # the chained curve starts at its anchor, the last row before it (base or direct)
            part = [i for i, c in enumerate(kinds) if c == kind or (kind == "direct" and c == "base")]
            if kind == "chained" and part:
                part = [part[0] - 1] + part
            part = [rows[i] for i in part if ok[i] and rows[i][key] is not None]
            if len(part) == 0:
                continue
            x = np.array([r["k"] for r in part])
            v, lo, hi = (np.array([r[f"{key}{s}"] for r in part], dtype=float) for s in ("", "_ci_low", "_ci_high"))
            ax.plot(x, v, style, color=color, ms=4, label=f"{kind} (CI band)")
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        own = [r for r in rows if r[f"h_own{tok}"] is not None and r["kind"] != "base"]
        if own:  # the own-sample check: a plain mean over the checkpoint's own samples
            v, se = (np.array([r[c] for r in own]) for c in (f"h_own{tok}", f"h_own{tok}_se"))
            ax.errorbar([r["k"] for r in own], v, yerr=1.96 * se, fmt="x", color="C2", label="own samples (±1.96 SE)")
        if h is not None:
            ax.axvline(h - 0.5, color="C3", ls=":", lw=1.2, label=f"IS horizon (k = {h})")
        bad = [r["k"] for r, good in zip(rows, ok) if not good]
        for k in bad:
            ax.axvspan(k - 0.3, k + 0.3, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel(f"H ({unit})")
        ax.set_xticks([r["k"] for r in rows], [r["checkpoint"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("checkpoint" + (" (grey: not valid at this level)" if bad else ""))
    axes[0].legend(fontsize=8)
    fig.suptitle("entropy along the checkpoints")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
