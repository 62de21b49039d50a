"""Own samples against fresh ones: one GRPO-style AdamW step on SmolLM2, its ΔH (the monitor's
headline) and ΔH₁ (the guard's probe along AdamW's direction) read on the samples the step was
trained on and on fresh samples of p0 drawn independently of the step.

    python benchmarks/bench_own_samples.py --lr 3e-6 --replicates 3

A trainer's monitor reads each step on the rows it trained on. Those rows are not independent of
θ1: the step raised the log-prob of each row with a positive advantage and lowered it for the
others, partly through that row's own gradient (its "self-influence"), which no other sequence
of p0 receives. Fresh rows of p0 see only the step's effect on the distribution. The table says
how far apart the two readings are, per replicate (a new batch and a new AdamW each time, from
the same p0), with the KL estimate beside them: on fresh rows E[log p0 − log p1] = KL ≥ 0, on own
rows it can go negative. Rows go to ``benchmarks/results/own_samples.jsonl`` as they finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from bench_guard import calibration_fit, records  # noqa: E402
from provenance import commit, device_name  # noqa: E402

RESULTS = ROOT / "results"


def replicate(model0, tok, args, seed: int) -> dict:
    import torch

    from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, sample
    from isdelta.probes import gradient_delta
    from isdelta.training import EntropyMonitor, answer_match, step_direction
    from isdelta.training.update import advantages

    recs = records()[: args.prompts]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in recs]
    t0 = time.perf_counter()
    kw = dict(transform=LogitTransform(), max_new_tokens=args.max_tokens, progress=False)
    own = sample(model0, tok, prompts, num_samples=args.generations, seed=seed, **kw)
    fresh = sample(model0, tok, prompts, num_samples=args.fresh, seed=seed + 10_000, **kw)
    group = own.rollouts.group.cpu().numpy()
    rewards = np.array([answer_match(t, recs[g]["answer"]) for t, g in zip(own.texts, group)])
    adv = advantages(rewards, group)
    model = copy.deepcopy(model0)
    cfg = EngineConfig(progress=False)
    # the GRPO loss without clipping (one iteration: the ratio is 1): −Σ A_i S_i / n_tokens
    s = LogProbEngine(cfg, requires_grad=True).score(model, own.rollouts)
    n_tokens = float(own.rollouts.completion_mask.sum())
    loss = -(torch.as_tensor(adv, dtype=s.logp.dtype) * s.logp).sum() / n_tokens
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    d = step_direction(model, opt)
    row = {"seed": seed, "lr": args.lr, "reward": float(rewards.mean()), "rows_own": own.rollouts.n_rows,
           "rows_fresh": fresh.rollouts.n_rows}  # fmt: skip
    keep = {}
    for name, smp in (("own", own), ("fresh", fresh)):
        ro = smp.rollouts
        g = gradient_delta(model, ro, d, per_token=True, engine_config=cfg)
        row[f"d1_tok_{name}"], row[f"d1_tok_se_{name}"] = g.delta1_tok.value, g.delta1_tok.se
        row[f"d1_{name}"], row[f"d1_se_{name}"] = g.delta1.value, g.delta1.se
        mon = EntropyMonitor(model, engine_config=cfg)
        keep[name] = (mon, mon.before(ro))
    opt.step()
    for name, (mon, snap) in keep.items():
        r = mon.after(snap)
        sc = r.scalars()
        for k in ("delta_tok", "delta_tok_se", "delta", "delta_se", "kl", "ess_frac", "method", "valid_tok", "h0_tok"):
            row[f"{k}_{name}"] = float(sc.get(f"entropy/{k}", float("nan")))
    row["seconds"] = time.perf_counter() - t0
    return row


def report(path: Path) -> list[str]:
    """The table of ``path``'s rows: per (lr, rows per prompt), the four per-token readings
    (mean over replicates ± their SE), KL on each row set, and the calibration of each ΔH₁
    against ΔH on fresh rows (the realised step), over every replicate."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keys = sorted({(r["lr"], r.get("generations", 8)) for r in rows})
    out = [
        "| lr | trained rows per prompt | replicates | KL trained · fresh | ESS/S fresh | ΔH₁ trained rows | "
        "ΔH₁ fresh rows | ΔH trained rows (valid per token) | ΔH fresh rows: the realised step (valid) | "
        "realised / ΔH₁ fresh |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(xs, valid=None):
        xs = np.asarray(xs, dtype=np.float64)
        ok = np.ones(len(xs), bool) if valid is None else np.asarray(valid) == 1
        tail = "" if valid is None else f" ({ok.sum()}/{len(xs)})"
        if not ok.any():
            return "not valid" + tail
        if ok.sum() == 1:
            return f"{xs[ok].mean():+.4f}{tail}"
        return f"{xs[ok].mean():+.4f} ± {xs[ok].std(ddof=1) / np.sqrt(ok.sum()):.4f}{tail}"

    for lr, g in keys:
        rs = [r for r in rows if r["lr"] == lr and r.get("generations", 8) == g]
        col = {k: [r[k] for r in rs] for k in rs[0]}
        read = np.array(col["valid_tok_fresh"]) == 1  # the realised step where fresh rows read it
        ratio = np.mean(np.array(col["delta_tok_fresh"])[read]) / np.mean(np.array(col["d1_tok_fresh"])[read])
        out.append(
            f"| {lr:g} | {g} | {len(rs)} | {np.mean(col['kl_own']):.3f} · {np.mean(col['kl_fresh']):.3f} | "
            f"{np.mean(col['ess_frac_fresh']):.2f} | {ms(col['d1_tok_own'])} | {ms(col['d1_tok_fresh'])} | "
            f"{ms(col['delta_tok_own'], col['valid_tok_own'])} | {ms(col['delta_tok_fresh'], col['valid_tok_fresh'])} | "
            f"{ratio:.2f} |"
        )
    ok = [r for r in rows if r.get("valid_tok_fresh") == 1]
    m, sm = (np.array([r[k] for r in ok]) for k in ("delta_tok_fresh", "delta_tok_se_fresh"))
    out += ["", "| prediction | steps | slope ΔH / ΔH₁ | R² | 95% interval covers ΔH |", "|---|---|---|---|---|"]
    for name, label in (("fresh", "fresh"), ("own", "trained")):
        p, sp = (np.array([r[f"{k}_{name}"] for r in ok]) for k in ("d1_tok", "d1_tok_se"))
        slope, r2, cover = calibration_fit(p, m, sp, sm)
        out.append(f"| ΔH₁ on {label} rows | {len(ok)} | {slope:.2f} | {r2:.2f} | {cover:.0%} |")
    return out


def plot(path: Path, png: Path) -> None:
    """Each step's realised ΔH per token (fresh rows) against the three readings that could stand
    for it: ΔH₁ on fresh rows, ΔH₁ on the trained rows, ΔH on the trained rows (±1.96 SE)."""
    from isdelta.outputs import pyplot

    plt = pyplot()
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    y, ye = np.array([r["delta_tok_fresh"] for r in rows]), np.array([r["delta_tok_se_fresh"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.2, 5))
    for key, label, c in (("d1_tok_fresh", "ΔH₁, fresh rows", "C0"), ("d1_tok_own", "ΔH₁, trained rows", "C3"),
                          ("delta_tok_own", "ΔH, trained rows", "C2")):  # fmt: skip
        x = np.array([r[key] for r in rows])
        xe = np.array([r[key.replace("_tok", "_tok_se") if key.startswith("d1") else "delta_tok_se_own"] for r in rows])
        ax.errorbar(x, y, xerr=1.96 * xe, yerr=1.96 * ye, fmt="o", color=c, label=label, alpha=0.8, capsize=2)
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    ax.plot([lo, 0], [lo, 0], color="grey", lw=0.8, label="y = x")
    ax.set(xlabel="reading, nats per token", ylabel="realised ΔH per token (fresh rows of p0)")
    ax.set_title("One AdamW GRPO step on SmolLM2, per replicate and lr", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--replicates", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--fresh", type=int, default=16, help="fresh samples of p0 per prompt")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "own_samples.jsonl"))
    ap.add_argument("--report", action="store_true", help="only print the table of --out's rows")
    args = ap.parse_args()
    if args.report:
        lines = report(Path(args.out))
        print("\n".join(lines))
        (RESULTS / "own_samples.md").write_text("\n".join(lines) + "\n")
        plot(Path(args.out), RESULTS / "own_samples.png")
        return
    import torch

    from isdelta.engine import load_model

    torch.set_num_threads(args.threads)
    model0, tok = load_model("smollm2-135m-instruct")
    head, dirty = commit("benchmarks/bench_own_samples.py", "isdelta")
    for r in range(args.replicates):
        row = replicate(model0, tok, args, args.seed + r)
        row.update(commit=head + ("+" if dirty else ""), device=device_name(), prompts=args.prompts,
                   generations=args.generations, fresh=args.fresh, max_tokens=args.max_tokens)  # fmt: skip
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
