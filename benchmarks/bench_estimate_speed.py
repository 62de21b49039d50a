"""``estimate`` on 10^6 rows in 10^4 prompts against a bare vectorised SNIS of the same arrays.

The bare SNIS is the least a ΔH with an SE can cost: per-prompt logsumexp weights, the weighted
means of −S0 and −S1, and the paired within-prompt variance, on 1-D row arrays sorted by prompt
(``np.*.reduceat``), as ``estimate`` receives them. ``estimate`` on the same arrays does more:
PSIS tail fits per prompt (G = 100 ≥ 25), 13 estimates with SEs (per sequence and per token,
plain and Rao–Blackwellised, ΔH₁) and the diagnostics. Both run in one process, interleaved,
best of ``--repeats``; one JSON line per measurement goes to ``benchmarks/results/``.

    python benchmarks/bench_estimate_speed.py [--repeats 7] [--prompts 10000] [--G 100]
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
sys.path.insert(0, str(ROOT))


def arrays(P: int, G: int, seed: int = 0) -> dict:
    """Rows of a moderate step: S0 ~ −Gamma, S1 = S0 + N(0, 0.3²), entropy sums alike."""
    rng = np.random.default_rng(seed)
    N = P * G
    s0 = -rng.gamma(2.0, 20.0, N)
    e0 = rng.gamma(2.0, 20.0, N)
    return {
        "log_p0": s0,
        "log_p1": np.minimum(s0 + rng.normal(0, 0.3, N), 0.0),
        "length": rng.integers(5, 200, N).astype(float),
        "group": np.repeat(np.arange(P), G),
        "entropy_sum0": e0,
        "entropy_sum1": np.maximum(e0 + rng.normal(0, 0.3, N), 0.0),
    }


def bare_snis(a: dict) -> tuple[float, float]:
    """ΔH and its paired SE, plain SNIS, in a few lines of numpy (rows sorted by prompt)."""
    g = a["group"]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(g)])
    f0, f1 = -a["log_p0"], -a["log_p1"]
    lr = a["log_p1"] - a["log_p0"]
    e = np.exp(lr - np.repeat(np.maximum.reduceat(lr, starts), sizes))
    w = e / np.repeat(np.add.reduceat(e, starts), sizes)  # w̄ per prompt
    h0, h1 = np.add.reduceat(f0, starts) / sizes, np.add.reduceat(w * f1, starts)
    psi = np.repeat(sizes, sizes) * w * (f1 - np.repeat(h1, sizes)) - (f0 - np.repeat(h0, sizes))
    m = np.add.reduceat(psi, starts) / sizes
    var = np.add.reduceat((psi - np.repeat(m, sizes)) ** 2, starts) / (sizes - 1)
    return float((h1 - h0).mean()), float(np.sqrt((var / sizes).sum()) / len(sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--G", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from isdelta.estimators import estimate
    from isdelta.estimators.psis import installed_flavour

    a = arrays(args.prompts, args.G)
    runs = {"bare": lambda: bare_snis(a), "estimate": lambda: estimate(**a)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in runs.values():  # warm-up (arviz-free now, but imports and first allocations)
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rec = {
        "rows": args.prompts * args.G,
        "prompts": args.prompts,
        "G": args.G,
        "weights": "psis",
        "psis": installed_flavour(),
        "bare_s": best["bare"],
        "estimate_s": best["estimate"],
        "ratio": best["estimate"] / best["bare"],
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "commit": commit,
    }
    with open(ROOT / "benchmarks" / "results" / "estimate_speed.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(
        f"{rec['rows']:,} rows, {args.prompts:,} prompts (G = {args.G}), psis: bare SNIS {best['bare'] * 1e3:.0f} ms, "
        f"estimate {best['estimate'] * 1e3:.0f} ms, ratio {rec['ratio']:.1f}× (best of {args.repeats}, {commit})"
    )


if __name__ == "__main__":
    main()
