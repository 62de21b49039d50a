"""Estimator benchmark: accuracy on an enumerable toy, SE ratios on real scores, wall time.

Three parts, one subcommand each; every part writes ``estimators_<part>.jsonl`` (one JSON line
per measurement, with commit, versions and machine) and ``estimators_<part>.md`` (the markdown
tables) into ``--out``, and prints the tables.

``toy``: the exactly enumerable autoregressive toy of ``tests/estimators/toy.py`` (exact ΔH by
enumeration). S = samples per prompt (G) with the toy's P = 4 prompts fixed, so N = 4·S rows.
For each S, ``--reps`` seeded sample sets are drawn from p0; every update size α and every method
is evaluated on the SAME sets (a paired comparison). Methods: sequence-level SNIS with weights
{none, psis, truncate} × {plain (−log p), Rao–Blackwellised (entropy sums)}, from ``estimate``,
and the per-decision ``estimate_tokens`` methods pd, pd_sn, cv. Reported per cell: bias (± MCSE),
SD, RMSE, mean CI width, coverage of the 95% CI, for ΔH and ΔH per token; ESS/S and k̂ of the
raw weights; and the two targets (RB variance ratio; coverage where ESS/S ≥ 0.3). Also the exact
S → ∞ Var(RB) / Var(plain) of raw SNIS for every toy in ``TOYS``, by enumeration (no sampling).
``--toy NAME`` other than ``default`` writes ``estimators_toy_NAME.*``.

``scores DIR``: real engine scores (``scores0.npz``, ``scores1.npz`` as ``isdelta.run`` saves
them): value and SE of every method, and SE ratios against SNIS.

``timing``: wall time of ``estimate`` on N = 10³ … 10⁶ synthetic rows (prompt groups of G rows)
for each weight scheme: median of warm calls, against a bare numpy SNIS (ΔH and its paired SE,
:func:`bare_snis`) timed on the same arrays, interleaved call by call; and the cold first call in
a fresh process.

``target``: the speed target alone (issue 18: ≤ 5× bare SNIS): ``estimate(weights="psis")`` with
entropy sums on N = 10⁶ rows in P = 10⁴ prompts of G = 100, and :func:`bare_snis` on the same
arrays, interleaved call by call for ``--rounds`` rounds in this one process; × bare SNIS as the
ratio of the medians and as the median (min–max) of the per-round ratios.

    python benchmarks/bench_estimators.py toy                  # ~8 min on 2 shared cores
    python benchmarks/bench_estimators.py toy --toy long --alphas 0.3 0.6 1.0 --S 64 256 1024 --reps 400
    python benchmarks/bench_estimators.py scores runs/demo     # seconds
    python benchmarks/bench_estimators.py timing               # ~1 min
    python benchmarks/bench_estimators.py target               # ~10 s

Results and their reading: benchmarks/README.md, section "Estimators".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "estimators"))  # the toy lives beside the tests
sys.path.insert(0, str(ROOT))

from toy import TabularToy  # noqa: E402 (found through the path set just above)

from benchmarks.provenance import commit  # noqa: E402 (ROOT is on the path from just above)

# isdelta is imported inside the functions that call it, so that the `cold` child can time
# the import of a process that has only numpy loaded.

WEIGHTS = {"none": "snis", "psis": "psis", "truncate": "trunc"}  # scheme: method label
SEQ_METHODS = tuple(f"{m}{rb}" for m in WEIGHTS.values() for rb in ("", "_rb"))
TOKEN_METHODS = ("pd", "pd_sn", "cv")
METHODS = SEQ_METHODS + TOKEN_METHODS
HEADERS = {"snis": "SNIS", "snis_rb": "SNIS-RB", "psis": "PSIS", "psis_rb": "PSIS-RB",
           "trunc": "trunc", "trunc_rb": "trunc-RB", "pd": "pd", "pd_sn": "pd_sn", "cv": "cv"}  # fmt: skip
ESTIMANDS = ("delta", "delta_tok")
TOKEN_KEYS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")
TOYS = {  # name: TabularToy kwargs
    "default": {"n_prompts": 4, "vocab": 4, "depth": 4, "seed": 0},
    "sharp": {"n_prompts": 4, "vocab": 4, "depth": 4, "seed": 0, "scale": 2.0},  # peaked H_t
    "long": {"n_prompts": 4, "vocab": 3, "depth": 8, "seed": 0},  # up to 8 tokens
}
ESS_GATE = 0.3  # coverage target applies where the raw-weight ESS/S is at least this
COVERAGE_BAND = (0.93, 0.97)
RB_TARGET = 0.5  # Var(RB) / Var(plain) at equal S
ROWS_PER_CHUNK = 2**19  # sampled rows held at once (token arrays are [reps, P, S, C])


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Commit (and whether the estimator code or this script differ from it), versions, machine."""
    import scipy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz 0.2x announces its refactor on import
        import arviz
    sha, dirty = commit("isdelta/estimators", "benchmarks/bench_estimators.py")
    return {
        "commit": sha,
        "estimators_dirty": dirty,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "arviz": arviz.__version__,
        "device": "cpu",
        "machine": f"{_cpu()}, {os.cpu_count()} cores visible",
        "dtype": "float64",
        "loadavg_1m_at_start": os.getloadavg()[0],  # the machine is shared: other jobs' load
    }


def write(out: Path, part: str, records: list[dict], tables: str) -> None:
    """``estimators_<part>.jsonl`` and ``estimators_<part>.md`` under ``out``; tables to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (out / f"estimators_{part}.jsonl").write_text(text)
    (out / f"estimators_{part}.md").write_text(tables + "\n")
    print(tables)


# ---------------------------------------------------------------------------------------------
# Part 1: the enumerable toy
# ---------------------------------------------------------------------------------------------


def _rep_sequence(sr: dict, r: int, group: np.ndarray) -> tuple[dict, dict]:
    """Sequence-level estimates of repetition r for every scheme, and the raw-weight diagnostics."""
    from isdelta.estimators import estimate

    args = [sr[k][r].ravel() for k in ("log_p0", "log_p1", "length")]  # [P·S] each
    ent = {k: sr[k][r].ravel() for k in ("entropy_sum0", "entropy_sum1")}
    out, diag = {}, {}
    for scheme, label in WEIGHTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k̂ / ESS warnings are expected at the larger α
            res = estimate(*args, group, **ent, weights=scheme)
        for rb in ("", "_rb"):
            out[label + rb] = {e: getattr(res, e + rb) for e in ESTIMANDS}
        diag[f"ess_frac_{label}"] = res.ess_frac
    diag["khat"], diag["khat_bad"] = res.khat, res.khat > res.khat_threshold
    return out, diag


def _rep_tokens(tr: dict, r: int, group: np.ndarray) -> dict:
    """Per-decision estimates of repetition r, one per method."""
    from isdelta.estimators import estimate_tokens

    arrays = [tr[k][r].reshape(-1, tr[k].shape[-1]) for k in TOKEN_KEYS]  # [P·S, C]
    out = {}
    for method in TOKEN_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = estimate_tokens(*arrays, group, method=method)
        out[method] = {e: getattr(res, e) for e in ESTIMANDS}
    return out


def _summary(ests: list, truth: float, gate: np.ndarray) -> dict:
    """Bias, SD, RMSE, CI width and coverage of one method over the repetitions."""
    v = np.array([e.value for e in ests])
    se = np.array([e.se for e in ests])
    covers = np.array([e.covers(truth) for e in ests])
    err, n = v - truth, len(ests)
    cov = float(covers.mean())
    return {
        "bias": float(err.mean()), "bias_mcse": float(err.std(ddof=1) / np.sqrt(n)),
        "sd": float(v.std(ddof=1)), "var": float(v.var(ddof=1)),
        "rmse": float(np.sqrt(np.mean(err**2))), "mean_se_over_sd": float(se.mean() / v.std(ddof=1)),
        "ci_width": float(np.mean([e.ci_high - e.ci_low for e in ests])),
        "coverage": cov, "coverage_mcse": float(np.sqrt(cov * (1 - cov) / n)),
        "coverage_ess_ok": float(covers[gate].mean()) if gate.any() else None,
    }  # fmt: skip


def _cell_records(reps: list, diags: list, truths: dict, cell: dict) -> list[dict]:
    """One record per (estimand, method) of a finished (α, S) cell."""
    d = {k: np.array([x[k] for x in diags], dtype=float) for k in diags[0]}
    gate = d["ess_frac_snis"] >= ESS_GATE  # per repetition, raw weights
    common = {
        **cell,
        "ess_frac": float(d["ess_frac_snis"].mean()),
        "ess_frac_psis": float(d["ess_frac_psis"].mean()),
        "ess_frac_trunc": float(d["ess_frac_trunc"].mean()),
        "khat_mean": float(np.nanmean(d["khat"])) if np.isfinite(d["khat"]).any() else None,
        "khat_bad_frac": float(d["khat_bad"].mean()),
        "ess_ok_frac": float(gate.mean()),
    }
    records = []
    for estimand in ESTIMANDS:
        for method in METHODS:
            if method not in reps[0]:
                continue
            ests = [rep[method][estimand] for rep in reps]
            stats = _summary(ests, truths[estimand], gate)
            records.append({**common, "estimand": estimand, "truth": truths[estimand],
                            "method": method, **stats})  # fmt: skip
    return records


def exact_var_ratio(toy: TabularToy, alpha: float) -> dict[str, float]:
    """S → ∞ Var(RB) / Var(plain) of raw-SNIS ΔH and ΔH/token, exactly, by enumeration.

    Both are Σ_p Var_p0(ψ) / G / P² with the influence functions ``estimate`` uses:
    ΔH: ψ = r(f1 − h1_p) − (f0 − h0_p); ΔH/token (ratio of means over prompts):
    ψ = r((f1 − N1_p) − R1 (L − D1_p)) / ΣD1 − ((f0 − N0_p) − R0 (L − D0_p)) / ΣD0,
    with f = −S (plain) or the entropy sum (RB); G and P cancel in the ratio.
    """
    e0, e1 = toy.enumerate(0.0), toy.enumerate(alpha)
    p0, r, length = e0.prob, np.exp(e1.logp - e0.logp), e0.length[None, :]  # [P, M]

    def var(psi: np.ndarray) -> float:  # Σ_p Var_p0(ψ), psi [P, M]
        mean = (p0 * psi).sum(1, keepdims=True)
        return float((p0 * (psi - mean) ** 2).sum())

    def psi_tok(f: np.ndarray, wt: np.ndarray) -> np.ndarray:
        num = (p0 * wt * f).sum(1, keepdims=True)  # N_p
        den = (p0 * wt * length).sum(1, keepdims=True)  # D_p
        rate = num.sum() / den.sum()
        return wt * ((f - num) - rate * (length - den)) / den.sum()

    out = {}
    for name, (f0, f1) in {"plain": (-e0.logp, -e1.logp),
                           "rb": (e0.entropy_sum, e1.entropy_sum)}.items():  # fmt: skip
        h0, h1 = (p0 * f0).sum(1, keepdims=True), (p0 * r * f1).sum(1, keepdims=True)
        out[f"delta_{name}"] = var(r * (f1 - h1) - (f0 - h0))
        out[f"delta_tok_{name}"] = var(psi_tok(f1, r) - psi_tok(f0, np.ones_like(r)))
    return {e: out[f"{e}_rb"] / out[f"{e}_plain"] for e in ESTIMANDS}


def exact_table(alphas: list) -> tuple[str, list[dict]]:
    """Exact S → ∞ Var(RB) / Var(plain) of raw SNIS for every toy in TOYS at each α."""
    records, lines = [], ["| toy | estimand | " + " | ".join(f"α = {a:g}" for a in alphas) + " |"]
    lines.append("|" + "---|" * (len(alphas) + 2))
    for name, kwargs in TOYS.items():
        toy = TabularToy(**kwargs)
        ratios = {a: exact_var_ratio(toy, a) for a in alphas}
        for e in ESTIMANDS:
            cells = [f"{ratios[a][e]:.2f}" for a in alphas]
            desc = f"V={toy.vocab}, depth {toy.depth}, scale {kwargs.get('scale', 1.0):g}"
            lines.append(f"| {name} ({desc}) | {e} | " + " | ".join(cells) + " |")
        records += [{"part": "toy_exact", "toy": name, "alpha": a, **{f"exact_var_ratio_{e}":
                     ratios[a][e] for e in ESTIMANDS}} for a in alphas]  # fmt: skip
    return "\n".join(lines), records


def toy_grid(toy_name: str, alphas: list, sizes: list, reps: int, seed: int, token_max_s: int):
    """Yield the records of every (α, S) cell; all α share each S's sample sets."""
    toy = TabularToy(**TOYS[toy_name])
    e0 = toy.enumerate(0.0).exact()
    truths = {}
    for a in alphas:
        e1 = toy.enumerate(a).exact()
        truths[a] = {"delta": e1["h"] - e0["h"], "delta_tok": e1["h_tok"] - e0["h_tok"]}
    p, c = toy.n_prompts, toy.depth
    for s in sizes:
        group = np.repeat(np.arange(p), s)  # [P·S], prompt-major
        rng = np.random.default_rng([seed, s])
        chunk = max(1, ROWS_PER_CHUNK // (p * s))
        acc = {a: ([], []) for a in alphas}
        seconds = dict.fromkeys(alphas, 0.0)
        for start in range(0, reps, chunk):
            ids = toy.sample(rng, 0.0, min(chunk, reps - start), s)  # [chunk, P, S]
            for a in alphas:
                t0 = time.perf_counter()
                sr = toy.rows(ids, 0.0, a)  # [chunk, P, S] per key
                tr = toy.token_rows(ids, 0.0, a) if s <= token_max_s else None  # [chunk, P, S, C]
                for r in range(ids.shape[0]):
                    est, diag = _rep_sequence(sr, r, group)
                    if tr is not None:
                        est.update(_rep_tokens(tr, r, group))
                    acc[a][0].append(est)
                    acc[a][1].append(diag)
                seconds[a] += time.perf_counter() - t0
        for a in alphas:
            exact = {f"exact_var_ratio_{e}": v for e, v in exact_var_ratio(toy, a).items()}
            cell = {"part": "toy", "toy": toy_name, "alpha": a, "S": s, "P": p, "N": p * s,
                    "C": c, "reps": reps, "seconds_cell": seconds[a], **exact}  # fmt: skip
            print(f"toy {toy_name} α={a:g} S={s}: {seconds[a]:.1f} s", file=sys.stderr, flush=True)
            yield from _cell_records(*acc[a], truths[a], cell)


def _by_cell(records: list[dict], estimand: str) -> dict:
    """{(toy, α, S): {method: record}} for one estimand."""
    cells: dict = {}
    for r in records:
        if r["estimand"] == estimand:
            cells.setdefault((r["toy"], r["alpha"], r["S"]), {})[r["method"]] = r
    return dict(sorted(cells.items()))


def _in_band(cov: float) -> bool:
    return COVERAGE_BAND[0] <= cov <= COVERAGE_BAND[1]


def metric_table(records: list[dict], estimand: str, metric: str, fmt: str) -> str:
    """Rows (α, S) with ESS/S and k̂ of the raw weights; one column per method.

    Coverage cells that miss the 93–97% band where ESS/S ≥ 0.3 are bold.
    """
    cells = _by_cell(records, estimand)
    methods = [m for m in METHODS if any(m in c for c in cells.values())]
    head = ["α", "S", "truth", "ESS/S", "k̂", *(HEADERS[m] for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_, alpha, s), by_m in cells.items():
        first = by_m["snis"]
        khat = "n/a" if first["khat_mean"] is None else f"{first['khat_mean']:.2f}"
        row = [f"{alpha:g}", str(s), f"{first['truth']:+.4f}", f"{first['ess_frac']:.2f}", khat]
        for m in methods:
            if m not in by_m:
                row.append("")
                continue
            text = format(by_m[m][metric], fmt)
            miss = metric == "coverage" and first["ess_frac"] >= ESS_GATE
            row.append(f"**{text}**" if miss and not _in_band(by_m[m][metric]) else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rb_table(records: list[dict]) -> tuple[str, list[dict]]:
    """Var(RB) / Var(plain) per weight scheme and estimand, with the target verdict per cell."""
    verdicts, lines = [], []
    head = ["α", "S", "ESS/S"]
    for e in ("ΔH", "ΔH/tok"):
        head += [f"{HEADERS[w]} {e}" for w in WEIGHTS.values()] + [f"exact S→∞ {e}"]
    head += ["cv / SNIS (ΔH)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = {e: _by_cell(records, e) for e in ESTIMANDS}
    for key, by_m in per["delta"].items():
        row = [f"{key[1]:g}", str(key[2]), f"{by_m['snis']['ess_frac']:.2f}"]
        for e in ESTIMANDS:
            for w in WEIGHTS.values():
                c = per[e][key]
                ratio = c[f"{w}_rb"]["var"] / c[w]["var"]
                met = ratio <= RB_TARGET
                verdicts.append({"alpha": key[1], "S": key[2], "estimand": e, "weights": w,
                                 "var_ratio": ratio, "met": met})  # fmt: skip
                row.append(f"{ratio:.2f}" if met else f"**{ratio:.2f}**")
            row.append(f"{by_m['snis'][f'exact_var_ratio_{e}']:.2f}")
        cv = by_m.get("cv")
        row.append(f"{cv['var'] / by_m['snis']['var']:.2f}" if cv else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), verdicts


def coverage_verdicts(records: list[dict]) -> list[dict]:
    """Every (cell, method, estimand) where ESS/S ≥ 0.3: coverage and whether it is in 93–97%."""
    out = []
    for r in records:
        if r["ess_frac"] >= ESS_GATE:
            out.append({k: r[k] for k in ("alpha", "S", "estimand", "method", "ess_frac",
                                          "coverage", "coverage_mcse", "mean_se_over_sd")}
                       | {"met": _in_band(r["coverage"])})  # fmt: skip
    return out


def _target_lines(rb: list[dict], cov: list[dict]) -> str:
    """Markdown: RB variance ratios per scheme; coverage per method where ESS/S ≥ 0.3."""
    lines = [f"RB target, Var(RB) / Var(plain) ≤ {RB_TARGET} in each (α, S) cell:", "",
             "| weights | estimand | cells met | ratio min … max |", "|---|---|---|---|"]  # fmt: skip
    for e in ESTIMANDS:
        for w in WEIGHTS.values():
            ratios = [v["var_ratio"] for v in rb if v["estimand"] == e and v["weights"] == w]
            met = sum(r <= RB_TARGET for r in ratios)
            lines.append(f"| {HEADERS[w]} | {e} | {met} of {len(ratios)} | "
                         f"{min(ratios):.2f} … {max(ratios):.2f} |")  # fmt: skip
    lo, hi = COVERAGE_BAND
    lines += ["", (f"Coverage target, {lo:.0%}–{hi:.0%} in the cells with ESS/S ≥ {ESS_GATE} "
                   "(\\* = outside the band by more than 2 MCSE):"), "",
              "| method | estimand | cells met | min coverage (α, S) | max coverage (α, S) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for e in ESTIMANDS:
        for m in METHODS:
            sel = [v for v in cov if v["estimand"] == e and v["method"] == m]
            if not sel:
                continue
            ends = []
            for v in (min(sel, key=lambda v: v["coverage"]), max(sel, key=lambda v: v["coverage"])):
                c, tol = v["coverage"], 2 * v["coverage_mcse"]
                star = "\\*" if c < lo - tol or c > hi + tol else ""
                ends.append(f"{c:.3f}{star} ({v['alpha']:g}, {v['S']})")
            met = sum(v["met"] for v in sel)
            lines.append(f"| {HEADERS[m]} | {e} | {met} of {len(sel)} | {ends[0]} | {ends[1]} |")
    return "\n".join(lines)


def toy_tables(records: list[dict]) -> tuple[str, list[dict]]:
    """Markdown for the toy part and the target verdict records."""
    toys = ", ".join(sorted({r["toy"] for r in records}))
    reps = ", ".join(str(n) for n in sorted({r["reps"] for r in records}))
    parts = [(f"Toy `{toys}`, {reps} sample sets per cell, 95% CIs; ESS/S and k̂ are means over "
              "the sets of the raw-weight diagnostics.")]  # fmt: skip
    specs = [("coverage", ".3f"), ("bias", "+.4f"), ("sd", ".4f"), ("rmse", ".4f"),
             ("ci_width", ".4f")]  # fmt: skip
    for estimand in ESTIMANDS:
        for metric, fmt in specs if estimand == "delta" else specs[:3]:
            parts.append(f"### {metric}, {estimand}\n\n" + metric_table(records, estimand, metric, fmt))
    table, rb = rb_table(records)
    parts.append("### Var(RB) / Var(plain) at equal S\n\n" + table)
    cov = coverage_verdicts(records)
    parts.append(_target_lines(rb, cov))
    exact, exact_records = exact_table(sorted({r["alpha"] for r in records}))
    parts.append("Exact S → ∞ Var(RB) / Var(plain) of raw SNIS, every toy (enumeration, no "
                 "sampling):\n\n" + exact)  # fmt: skip
    verdicts = exact_records
    verdicts += [{"part": "toy_target", "target": "rb_variance", **v} for v in rb]
    verdicts += [{"part": "toy_target", "target": "coverage", **v} for v in cov]
    return "\n\n".join(parts), verdicts


# ---------------------------------------------------------------------------------------------
# Part 2: real scores
# ---------------------------------------------------------------------------------------------


def real_records(scores: Path) -> list[dict]:
    """Value and SE of every method on real engine scores, with SE ratios against SNIS."""
    from isdelta.estimators import estimate, estimate_tokens

    s0, s1 = np.load(scores / "scores0.npz"), np.load(scores / "scores1.npz")
    ests, diag = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the diagnostics are reported below instead
        for scheme, label in WEIGHTS.items():
            res = estimate(s0["logp"], s1["logp"], s0["length"], s0["group"], weights=scheme,
                           entropy_sum0=s0["entropy_sum"], entropy_sum1=s1["entropy_sum"])  # fmt: skip
            for rb in ("", "_rb"):
                ests[label + rb] = {e: getattr(res, e + rb) for e in ESTIMANDS}
            diag[label] = {"ess_frac": res.ess_frac, "khat": res.khat}
        for m in TOKEN_METHODS:
            res = estimate_tokens(s0["token_logp"], s1["token_logp"], s0["token_entropy"],
                                  s1["token_entropy"], s0["mask"], s0["group"], method=m)  # fmt: skip
            ests[m] = {e: getattr(res, e) for e in ESTIMANDS}
    n, c = s0["mask"].shape
    records = []
    for e in ESTIMANDS:
        for m, by_e in ests.items():
            est = by_e[e]
            records.append({
                "part": "scores", "scores": str(scores), "N": int(n), "C": int(c),
                "P": int(np.unique(s0["group"]).size), "method": m, "estimand": e,
                "value": est.value, "se": est.se,
                "se_over_snis": est.se / ests["snis"][e].se,
                "se_over_snis_rb": est.se / ests["snis_rb"][e].se,
                "se_over_psis": est.se / ests["psis"][e].se,
                "ess_frac": diag["snis"]["ess_frac"], "khat": diag["snis"]["khat"],
            })  # fmt: skip
    return records


def real_table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        (
            f"{r0['scores']}: P = {r0['P']} prompts, N = {r0['N']} rows, C = {r0['C']}; "
            f"raw-weight ESS/S {r0['ess_frac']:.2f}, k̂ {r0['khat']:.2f}"
        ),
        "",
        "| estimand | method | value | SE | SE / SNIS | SE / SNIS-RB | SE / PSIS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['estimand']} | {HEADERS[r['method']]} | {r['value']:+.4g} | {r['se']:.3g} | "
            f"{r['se_over_snis']:.2f} | {r['se_over_snis_rb']:.2f} | {r['se_over_psis']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Part 3: wall time
# ---------------------------------------------------------------------------------------------


def timing_rows(n_prompts: int, g: int, seed: int) -> dict:
    """Synthetic engine outputs for P·G rows, prompt-major: L ∈ [16, 512], per-token NLL ≈ 1.2
    nats, per-row log-ratio sd 0.03·√L (ESS/S ≈ 0.6, as after a modest update)."""
    rng = np.random.default_rng(seed)
    n = n_prompts * g
    length = rng.integers(16, 513, n).astype(np.float64)
    root = np.sqrt(length)
    log_p0 = -(1.2 * length + 0.8 * root * rng.standard_normal(n))
    ent0 = 1.1 * length + 0.3 * root * rng.standard_normal(n)
    return {
        "log_p0": log_p0,
        "log_p1": log_p0 + 0.03 * root * rng.standard_normal(n),
        "length": length,
        "group": np.repeat(np.arange(n_prompts), g),
        "entropy_sum0": ent0,
        "entropy_sum1": ent0 + 0.1 * root * rng.standard_normal(n),
    }


def bare_snis(x: dict, g: int) -> tuple[float, float]:
    """ΔH and its paired SE by plain SNIS in a few lines of numpy, the floor ``estimate`` is
    held to: per-prompt softmax weights, the weighted means of −S1 and −S0, and the within-prompt
    variance of the paired influence ψ = G w (−S1 − H1_p) − (−S0 − H0_p) (rows prompt-major)."""
    s0, s1 = x["log_p0"].reshape(-1, g), x["log_p1"].reshape(-1, g)  # [P, G]
    log_r = s1 - s0
    w = np.exp(log_r - log_r.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    h0, h1 = -s0.mean(1), -(w * s1).sum(1)  # [P]
    psi = g * w * (-s1 - h1[:, None]) - (-s0 - h0[:, None])  # [P, G]
    se = np.sqrt((psi.var(1, ddof=1) / g).sum()) / len(h0)
    return float((h1 - h0).mean()), float(se)


def _call(x: dict, scheme: str):
    from isdelta.estimators import estimate  # lazy: the cold child times this import

    return estimate(x["log_p0"], x["log_p1"], x["length"], x["group"], weights=scheme,
                    entropy_sum0=x["entropy_sum0"], entropy_sum1=x["entropy_sum1"])  # fmt: skip


def _median_time(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def warm_records(
    sizes: list[int], gs: list[int], seed: int, schemes=tuple(WEIGHTS), rounds: int | None = None
) -> list[dict]:
    """Warm wall time of ``estimate`` per (N, G, scheme) and of :func:`bare_snis` on the same
    arrays, interleaved call by call (a busy machine slows both alike), after one warm-up each;
    ``rounds`` rounds (default 5 from N = 5·10^5, else 9). × bare is the ratio of the medians and,
    steadier on a shared machine, the median of the ratios within each round."""
    records = []
    for g in gs:
        for n in sizes:
            p = max(2, round(n / g))
            x = timing_rows(p, g, seed)
            repeats = rounds or (5 if p * g >= 500_000 else 9)
            fns = {"bare": lambda x=x, g=g: bare_snis(x, g)} | {s: (lambda x=x, s=s: _call(x, s)) for s in schemes}
            times: dict[str, list[float]] = {k: [] for k in fns}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for fn in fns.values():
                    fn()
                for _ in range(repeats):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                bare = float(np.median(times["bare"]))
                for scheme in schemes:
                    res, ts = _call(x, scheme), times[scheme]
                    med = float(np.median(ts))
                    per_round = np.divide(ts, times["bare"])  # this round's estimate / this round's bare
                    none = float(np.median(times["none"])) if "none" in times else float("nan")
                    records.append({"part": "timing", "N": p * g, "G": g, "P": p, "weights": scheme,
                                    "repeats": repeats, "times_s": ts, "median_s": med, "min_s": min(ts),
                                    "bare_snis_s": bare, "bare_snis_times_s": times["bare"],
                                    "over_bare": med / bare, "rows_per_s": p * g / med,
                                    "over_bare_rounds": float(np.median(per_round)),
                                    "over_bare_rounds_range": [float(per_round.min()), float(per_round.max())],
                                    "over_none": med / none, "weights_used": res.weights_used,
                                    "ess_frac": res.ess_frac, "khat": res.khat})  # fmt: skip
                    print(f"timing N={p * g} G={g} {scheme}: {med:.4f} s ({med / bare:.1f}× bare)", file=sys.stderr)
    return records


def target_profile(calls: int, top: int = 25) -> str:
    """cProfile of ``calls`` calls of the target's ``estimate``: the functions with the most
    cumulative time, as a fenced block (cProfile's overhead inflates the times; compare shares)."""
    import cProfile
    import io
    import pstats

    x = timing_rows(10_000, 100, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _call(x, "psis")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            _call(x, "psis")
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    body = "\n".join(line for line in out.getvalue().splitlines() if line.strip())
    return f"\n\ncProfile of {calls} calls, by cumulative time:\n\n```\n{body}\n```"


def cold_child(n_prompts: int, g: int, scheme: str) -> dict:
    """In a fresh process: import time of the estimators, then the first and a second call."""
    x = timing_rows(n_prompts, g, 0)
    t0 = time.perf_counter()
    import isdelta.estimators  # noqa: F401

    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _call(x, scheme)
        t2 = time.perf_counter()
        _call(x, scheme)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}


def cold_records(n: int, g: int) -> list[dict]:
    """One fresh interpreter per scheme (``cold`` subcommand): the first call imports arviz."""
    records = []
    p = max(2, round(n / g))
    for scheme in WEIGHTS:
        cmd = [sys.executable, __file__, "cold", str(p), str(g), scheme]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        records.append({"part": "timing_cold", "N": p * g, "G": g, "P": p, "weights": scheme,
                        **rec, "first_minus_warm_s": rec["first_call_s"] - rec["second_call_s"]})  # fmt: skip
    return records


def warm_table(warm: list[dict]) -> str:
    """One row per (N, G, scheme): times, rows / s, × bare SNIS (of the medians; median, min and max
    of the per-round ratios), × none, ESS/S and k̂."""
    lines = [
        (
            "| N | G | P | weights (where) | median s | min s | rows / s | bare SNIS ms | × bare SNIS | "
            "× bare, per round: median (min–max) | × none | ESS/S | k̂ |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in warm:
        where = "pooled" if "pooled" in r["weights_used"] else "per prompt"
        lo, hi = r["over_bare_rounds_range"]
        lines.append(
            f"| {r['N']} | {r['G']} | {r['P']} | {r['weights']} ({where}) | {r['median_s']:.4f} | "
            f"{r['min_s']:.4f} | {r['rows_per_s']:.3g} | {r['bare_snis_s'] * 1e3:.2f} | {r['over_bare']:.1f} | "
            f"{r['over_bare_rounds']:.2f} ({lo:.2f}–{hi:.2f}) | "
            f"{'–' if np.isnan(r['over_none']) else format(r['over_none'], '.2f')} | "
            f"{r['ess_frac']:.2f} | {r['khat']:.2f} |"
        )
    return "\n".join(lines)


def timing_tables(warm: list[dict], cold: list[dict]) -> str:
    lines = [
        warm_table(warm),
        "",
        "Cold start (fresh interpreter, numpy already imported):",
        "",
        ("| N | G | weights | import isdelta.estimators s | first call s | second call s | first − second s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in cold:
        lines.append(
            f"| {r['N']} | {r['G']} | {r['weights']} | {r['import_s']:.3f} | "
            f"{r['first_call_s']:.3f} | {r['second_call_s']:.4f} | {r['first_minus_warm_s']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="folder for estimators_<part>.jsonl / .md")  # fmt: skip
    sub = ap.add_subparsers(dest="part", required=True)
    toy = sub.add_parser("toy", help="bias, SD, RMSE, CI width, coverage on the enumerable toy")
    toy.add_argument("--reps", type=int, default=1000, help="sample sets per S")
    toy.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.6, 1.0, 1.5, 2.0])
    toy.add_argument("--S", type=int, nargs="+", default=[16, 64, 256, 1024, 4096], dest="sizes")
    toy.add_argument("--toy", default="default", choices=list(TOYS))
    toy.add_argument("--token-max-S", type=int, default=4096, help="pd/pd_sn/cv up to this S")
    toy.add_argument("--seed", type=int, default=0)
    scores = sub.add_parser("scores", help="SE ratios on real engine scores")
    scores.add_argument("dir", type=Path, help="folder with scores0.npz and scores1.npz")
    timing = sub.add_parser("timing", help="estimate wall time, warm and cold")
    timing.add_argument("--N", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6],
                        dest="sizes")  # fmt: skip
    timing.add_argument("--G", type=int, nargs="+", default=[100, 8], dest="gs")
    timing.add_argument("--cold-N", type=int, default=10**4)
    target = sub.add_parser("target", help="the speed target: psis with entropy sums, 10^6 rows, 10^4 prompts")
    target.add_argument("--rounds", type=int, default=15, help="interleaved rounds of estimate and bare SNIS")
    target.add_argument("--profile", type=int, default=0, metavar="CALLS",
                        help="then cProfile this many calls: where the time goes, by function")  # fmt: skip
    cold = sub.add_parser("cold", help="internal: one cold call in this fresh process")
    cold.add_argument("n_prompts", type=int)
    cold.add_argument("g", type=int)
    cold.add_argument("weights", choices=list(WEIGHTS))
    return ap


def main() -> None:
    args = _parser().parse_args()
    if args.part == "cold":
        print(json.dumps(cold_child(args.n_prompts, args.g, args.weights)))
        return
    meta, t0, part = provenance(), time.perf_counter(), args.part
    if args.part == "toy":
        grid = toy_grid(args.toy, args.alphas, args.sizes, args.reps, args.seed, args.token_max_S)
        records = list(grid)
        tables, verdicts = toy_tables(records)
        records += verdicts
        part = "toy" if args.toy == "default" else f"toy_{args.toy}"
    elif args.part == "scores":
        records = real_records(args.dir)
        tables = real_table(records)
    elif args.part == "target":
        records = warm_records([10**6], [100], seed=0, schemes=("psis",), rounds=args.rounds)
        tables = warm_table(records) + (target_profile(args.profile) if args.profile else "")
    else:
        warm = warm_records(args.sizes, args.gs, seed=0)
        cold = cold_records(args.cold_N, args.gs[0])
        records, tables = warm + cold, timing_tables(warm, cold)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/bench_estimators.py " + " ".join(sys.argv[1:])
    records = [{**r, **meta, "command": command} for r in records]
    head = (f"`{command}` ({seconds:.0f} s); commit {meta['commit']}"
            f"{' + uncommitted changes' if meta['estimators_dirty'] else ''}, {meta['machine']}, "
            f"{meta['device']}, {meta['dtype']}, numpy {meta['numpy']}, arviz {meta['arviz']}")  # fmt: skip
    write(args.out, part, records, head + "\n\n" + tables)


if __name__ == "__main__":
    main()
