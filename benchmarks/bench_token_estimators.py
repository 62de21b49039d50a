"""Accuracy of the per-decision ΔH estimators (pd, pd_sn, cv) against sequence-level SNIS.

Part 1, the enumerable toy (tests/estimators/toy.py; exact ΔH): for each update size α and
samples per prompt G, ``--reps`` seeded repetitions of every estimator on the SAME samples;
bias, SD, RMSE, mean CI width and CI coverage of ΔH and ΔH per token. SNIS is
``estimate(..., weights="none")``, plain (−log p) and Rao–Blackwellised (entropy sums).
Part 2, with ``--scores DIR`` (np.savez of the engine arrays, ``scores0.npz`` and
``scores1.npz``): the SE of each per-decision estimator over the SE of SNIS, on real samples.

    python benchmarks/bench_token_estimators.py                       # toy, ~1 min
    python benchmarks/bench_token_estimators.py --reps 100 --scores /tmp/demo1

One JSON line per measurement on stdout (``--json FILE`` also writes them), then markdown tables.
"""

from __future__ import annotations

import argparse
import json
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

from toy import TabularToy

from isdelta.estimators import estimate, estimate_tokens

TOKEN_KEYS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")
METHODS = ("snis", "snis_rb", "pd", "pd_sn", "cv")
TOYS = {  # name: TabularToy kwargs
    "default": {"n_prompts": 4, "vocab": 4, "depth": 4, "seed": 0},
    "sharp": {"n_prompts": 4, "vocab": 4, "depth": 4, "seed": 0, "scale": 2.0},  # peaked H_t
    "long": {"n_prompts": 4, "vocab": 3, "depth": 8, "seed": 0},  # up to 8 tokens
}


def commit() -> str:
    cmd = ["git", "rev-parse", "--short", "HEAD"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout.strip() or "unknown"


def one_rep(tr: dict, sr: dict, r: int, group: np.ndarray) -> dict[str, dict]:
    """{method: {"delta": Estimate, "delta_tok": Estimate}} for repetition r."""
    seq = estimate(sr["log_p0"][r].ravel(), sr["log_p1"][r].ravel(), sr["length"][r].ravel(), group,
                   entropy_sum0=sr["entropy_sum0"][r].ravel(),
                   entropy_sum1=sr["entropy_sum1"][r].ravel(), weights="none")  # fmt: skip
    out = {
        "snis": {"delta": seq.delta, "delta_tok": seq.delta_tok},
        "snis_rb": {"delta": seq.delta_rb, "delta_tok": seq.delta_tok_rb},
    }
    arrays = [tr[k][r].reshape(-1, tr[k].shape[-1]) for k in TOKEN_KEYS]  # [N, C]
    for method in ("pd", "pd_sn", "cv"):
        res = estimate_tokens(*arrays, group, method=method)
        out[method] = {"delta": res.delta, "delta_tok": res.delta_tok}
    return out


def toy_cell(toy_name: str, alpha: float, g: int, reps: int, seed: int) -> list[dict]:
    """Every method × {delta, delta_tok} at one (toy, α, G): one record each."""
    toy = TabularToy(**TOYS[toy_name])
    e0, e1 = toy.enumerate(0.0).exact(), toy.enumerate(alpha).exact()
    truth = {"delta": e1["h"] - e0["h"], "delta_tok": e1["h_tok"] - e0["h_tok"]}
    ids = toy.sample(np.random.default_rng(seed), 0.0, reps, g)  # [reps, P, G]
    tr, sr = toy.token_rows(ids, 0.0, alpha), toy.rows(ids, 0.0, alpha)
    group = np.repeat(np.arange(toy.n_prompts), g)
    runs = {m: {"delta": [], "delta_tok": []} for m in METHODS}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ESS / k̂ warnings are expected at the larger steps
        for r in range(reps):
            for m, ests in one_rep(tr, sr, r, group).items():
                for name, est in ests.items():
                    runs[m][name].append(est)
    seconds = time.perf_counter() - t0
    records = []
    for name in ("delta", "delta_tok"):
        for m in METHODS:
            ests = runs[m][name]
            v = np.array([e.value for e in ests])
            err = v - truth[name]
            records.append({
                "toy": toy_name, "alpha": alpha, "G": g, "P": toy.n_prompts, "reps": reps,
                "method": m, "estimand": name, "truth": truth[name],
                "bias": float(err.mean()), "bias_mcse": float(err.std(ddof=1) / np.sqrt(reps)),
                "sd": float(v.std(ddof=1)), "rmse": float(np.sqrt(np.mean(err**2))),
                "ci_width": float(np.mean([e.ci_high - e.ci_low for e in ests])),
                "coverage": float(np.mean([e.covers(truth[name]) for e in ests])),
                "seconds_all_methods": seconds,
            })  # fmt: skip
    return records


def real_ratios(scores: Path) -> list[dict]:
    """SE (and value) of every method on real engine scores; ratios against SNIS."""
    s0, s1 = np.load(scores / "scores0.npz"), np.load(scores / "scores1.npz")
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq = {
            w: estimate(s0["logp"], s1["logp"], s0["length"], s0["group"], weights=w,
                        entropy_sum0=s0["entropy_sum"], entropy_sum1=s1["entropy_sum"])
            for w in ("none", "psis")
        }  # fmt: skip
        tok = {
            m: estimate_tokens(s0["token_logp"], s1["token_logp"], s0["token_entropy"],
                               s1["token_entropy"], s0["mask"], s0["group"], method=m)
            for m in ("pd", "pd_sn", "cv")
        }  # fmt: skip
    base = {f"snis_{w}{rb}": seq[w] for w in seq for rb in ("", "_rb")}
    for name in ("delta", "delta_tok"):
        snis = {k: getattr(v, name + ("_rb" if k.endswith("_rb") else "")) for k, v in base.items()}
        for m, res in [*snis.items(), *tok.items()]:
            est = res if m in snis else getattr(res, name)
            records.append({
                "scores": str(scores), "N": s0["mask"].shape[0], "C": s0["mask"].shape[1],
                "method": m, "estimand": name, "value": est.value, "se": est.se,
                "se_over_snis_none": est.se / snis["snis_none"].se,
                "se_over_snis_none_rb": est.se / snis["snis_none_rb"].se,
                "se_over_snis_psis": est.se / snis["snis_psis"].se,
            })  # fmt: skip
    return records


def toy_table(records: list[dict]) -> str:
    lines = [
        (
            "| toy | α | G | estimand | truth | method | bias (± mcse) | SD | RMSE | CI width "
            "| coverage |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['toy']} | {r['alpha']:g} | {r['G']} | {r['estimand']} | {r['truth']:+.4f} | "
            f"{r['method']} | {r['bias']:+.4f} (± {r['bias_mcse']:.4f}) | {r['sd']:.4f} | "
            f"{r['rmse']:.4f} | {r['ci_width']:.4f} | {r['coverage']:.3f} |"
        )
    return "\n".join(lines)


def real_table(records: list[dict]) -> str:
    lines = [
        "| estimand | method | value | SE | SE / SNIS | SE / SNIS-RB | SE / PSIS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['estimand']} | {r['method']} | {r['value']:+.4g} | {r['se']:.3g} | "
            f"{r['se_over_snis_none']:.2f} | {r['se_over_snis_none_rb']:.2f} | "
            f"{r['se_over_snis_psis']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=400, help="repetitions per (toy, α, G)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    ap.add_argument("--G", type=int, nargs="+", default=[16, 64, 256], dest="gs")
    ap.add_argument("--toys", nargs="+", default=["default"], choices=list(TOYS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scores", type=Path, help="folder with scores0.npz and scores1.npz")
    ap.add_argument("--no-toy", action="store_true", help="only the --scores comparison")
    ap.add_argument("--json", type=Path, help="also write the JSON lines here")
    args = ap.parse_args()
    meta = {"commit": commit(), "python": platform.python_version(), "numpy": np.__version__}
    toy_records, real_records = [], []
    if not args.no_toy:
        for toy_name in args.toys:
            for alpha in args.alphas:
                for g in args.gs:
                    for rec in toy_cell(toy_name, alpha, g, args.reps, args.seed + g):
                        toy_records.append({**rec, **meta})
                        print(json.dumps(toy_records[-1]), flush=True)
    if args.scores is not None:
        for rec in real_ratios(args.scores):
            real_records.append({**rec, **meta})
            print(json.dumps(real_records[-1]), flush=True)
    if args.json is not None:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in toy_records + real_records))
    if toy_records:
        print(f"\ntoy (exact ΔH by enumeration), {args.reps} repetitions per row, 95% CIs\n")
        print(toy_table(toy_records))
    if real_records:
        print(f"\nreal scores {args.scores}: SE ratios (new / SNIS), 95% CIs\n")
        print(real_table(real_records))


if __name__ == "__main__":
    main()
