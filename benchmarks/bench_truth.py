"""Ground truth on the real model: every estimator's ΔH against direct Monte Carlo, real update steps.

For a grid of update steps on SmolLM2-135M-Instruct (SFT and REINFORCE, SGD and AdamW, step sizes
from "invisible" to "ESS collapses"), the truth ΔH = H(p1) − H(p0) comes from independent samples
of p1 and of p0 (T per prompt, Rao–Blackwellised: each sample's Σ_t H_t), drawn with the same seeds
so that the pairs are coupled (identical completions where the step did not move the sampler),
which shrinks the paired SE. The estimators see only a sample of p0: a pool of M completions per
prompt is drawn once, scored under p0 and under every p1, and cut into M / G disjoint sample sets
of G per prompt (independent, since the pool is i.i.d.). Every method's value, SE and CI on every
sample set, and the headline policy's verdict, are compared with the truth:

    python benchmarks/bench_truth.py sample            # phase A: samples and scores (resumable)
    python benchmarks/bench_truth.py analyse           # phase B: estimates, coverage, the table
    python benchmarks/bench_truth.py calibrate         # the warnings' false alarms and detection
    python benchmarks/bench_truth.py policy            # the headline policy's thresholds, on a grid
    python benchmarks/bench_truth.py bf16              # is a tiny AdamW step visible in bf16?

Phase A writes ``runs/truth/`` (arrays per model, resumable: a finished model is never redone);
phase B writes ``benchmarks/results/truth.jsonl`` (one line per step × G × method) and
``benchmarks/results/truth.md`` (the table in benchmarks/README.md). Cost on 2 CPU cores: p0
about 10 minutes, then about 7 minutes per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import truth_long  # noqa: E402 (benchmarks/ on the path first)

# name: (loss, optimizer, lr)
STEPS = {
    "sft-sgd-3e-4": ("sft", "sgd", 3e-4),
    "sft-sgd-1e-3": ("sft", "sgd", 1e-3),
    "sft-sgd-3e-3": ("sft", "sgd", 3e-3),
    "sft-adamw-1e-6": ("sft", "adamw", 1e-6),
    "sft-adamw-3e-6": ("sft", "adamw", 3e-6),
    "sft-adamw-1e-5": ("sft", "adamw", 1e-5),
    "rl-sgd-1e-3": ("reinforce", "sgd", 1e-3),
    "rl-adamw-3e-6": ("reinforce", "adamw", 3e-6),
}
POOL_SEED, TRUTH_SEED, TRAIN_SEED = 11, 22, 33
METHODS = ("snis", "snis_psis", "snis_rb", "cv", "pd", "pd_sn")


# ---------------------------------------------------------------------------- phase A
def records() -> list[dict]:
    text = (files("isdelta") / "data" / "math.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def score(model, rollouts, path: Path) -> dict:
    """Whole-sequence and per-position scores (numpy), saved to ``path``."""
    from isdelta.engine import EngineConfig, LogProbEngine
    from isdelta.outputs import atomic_write

    keys = ("logp", "length", "entropy_sum", "group", "stopped", "token_logp", "token_entropy", "mask")
    arrays = LogProbEngine(EngineConfig(progress=False)).score(model, rollouts).to_numpy()
    arrays = {k: arrays[k] for k in keys}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays


def draw(model, tok, prompts, n: int, seed: int, max_new_tokens: int, path: Path, transform=None):
    """Samples of ``model`` (saved; reloaded when they exist), at temperature 1 unless ``transform``."""
    from isdelta.engine import LogitTransform, Samples, sample

    if path.exists():
        return Samples.load(path)
    s = sample(
        model,
        tok,
        prompts,
        num_samples=n,
        transform=transform or LogitTransform(),
        max_new_tokens=max_new_tokens,
        seed=seed,
        progress=False,
    )
    s.save(path)
    return s


def train_batches(model0, tok, out: Path, args):
    """The update's batches: reference responses (SFT) and p0 samples with rewards (REINFORCE),
    on all 12 prompts of the shipped data (the entropy is measured on the first ``prompts``)."""
    from isdelta.engine import Rollouts
    from isdelta.training import REWARDS

    recs = records()
    sft_prompts = [tok.apply_chat_template(chat(r["prompt"]), add_generation_prompt=True, tokenize=True) for r in recs]
    sft_prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in sft_prompts]
    comps = [tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in recs]
    sft = Rollouts.from_token_lists(sft_prompts, comps, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rl = draw(model0, tok, [chat(r["prompt"]) for r in recs], 8, TRAIN_SEED, 48, out / "train_rl.pt")
    answers = [recs[g]["answer"] for g in rl.rollouts.group.tolist()]
    rewards = np.array([REWARDS["answer_match"](t, str(a)) for t, a in zip(rl.texts, answers)])
    return sft, (rl.rollouts, rewards)


def make_p1(model0, name: str, batches, steps: dict | None = None):
    import torch

    from isdelta.engine import EngineConfig
    from isdelta.training import update

    loss, optimizer, lr = (steps or STEPS)[name]
    model1 = copy.deepcopy(model0)
    torch.manual_seed(0)
    if loss == "sft":
        info = update(
            model1,
            loss="sft",
            rollouts=batches[0],
            optimizer=optimizer,
            lr=lr,
            engine_config=EngineConfig(token_budget=4096),
            progress=False,
        )
    else:
        ro, rewards = batches[1]
        info = update(
            model1,
            loss="reinforce",
            rollouts=ro,
            rewards=rewards,
            optimizer=optimizer,
            lr=lr,
            engine_config=EngineConfig(token_budget=4096),
            progress=False,
        )
    return model1, info.to_dict()


def suite(args) -> tuple[list, dict]:
    """(the measured prompts, the steps) of ``--suite``."""
    if args.suite == "long":
        return truth_long.prompts(args.prompts), truth_long.LONG_STEPS
    return [chat(r["prompt"]) for r in records()[: args.prompts]], STEPS


def log_time(out: Path, phase: str, seconds: float, **extra) -> None:
    """One line per finished phase in ``out/timings.jsonl`` (the cost of each phase, for the notes)."""
    with open(out / "timings.jsonl", "a") as f:
        f.write(json.dumps({"phase": phase, "seconds": round(seconds, 1), **extra}) + "\n")
    print(f"[truth] {phase} done ({seconds:.0f} s)", file=sys.stderr, flush=True)


def phase_sample(args) -> None:
    import torch

    from isdelta.engine import load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model0, tok = load_model("smollm2-135m-instruct")
    prompts, steps = suite(args)
    t0 = time.perf_counter()
    pool = draw(model0, tok, prompts, args.pool, POOL_SEED, args.new_tokens, out / "pool.pt")
    truth0 = draw(model0, tok, prompts, args.truth, TRUTH_SEED, args.new_tokens, out / "truth_p0.pt")
    if not (out / "pool_p0.npz").exists():
        score(model0, pool.rollouts, out / "pool_p0.npz")
    if not (out / "truth_p0.npz").exists():
        score(model0, truth0.rollouts, out / "truth_p0.npz")
        log_time(out, "p0", time.perf_counter() - t0, rows=len(pool.texts) + len(truth0.texts))
    t0 = time.perf_counter()
    if args.suite == "long":
        batches = truth_long.train_batches(model0, tok, out.parent, records(), TRAIN_SEED, draw)
    else:
        batches = train_batches(model0, tok, out, args)
    for name in args.steps or steps:
        if (out / f"pool_{name}.npz").exists() and (out / f"truth_{name}.npz").exists():
            continue
        t0 = time.perf_counter()
        model1, info = make_p1(model0, name, batches, steps)
        truth1 = draw(model1, tok, prompts, args.truth, TRUTH_SEED, args.new_tokens, out / f"truth_{name}.pt")
        t1 = time.perf_counter()
        score(model1, truth1.rollouts, out / f"truth_{name}.npz")
        score(model1, pool.rollouts, out / f"pool_{name}.npz")
        (out / f"update_{name}.json").write_text(json.dumps(info, indent=2, default=str))
        log_time(out, name, time.perf_counter() - t0, sampling=round(t1 - t0, 1))
        del model1


# ---------------------------------------------------------------------------- phase B
def load(out: Path, name: str) -> tuple[dict, dict]:
    with np.load(out / f"pool_{name}.npz") as z:
        pool = dict(z)
    with np.load(out / f"truth_{name}.npz") as z:
        truth = dict(z)
    return pool, truth


def truth_delta(t0: dict, t1: dict) -> dict:
    """ΔH per sequence and per token from coupled samples of p1 and p0 (Rao–Blackwellised), with
    paired SEs: pairs share a seed and are independent across rows (prompt mass 1/P)."""
    g = t0["group"]
    prompts = np.unique(g)
    P = len(prompts)
    d = t1["entropy_sum"] - t0["entropy_sum"]  # [T·P] paired differences
    seq = np.mean([d[g == p].mean() for p in prompts])
    se = math.sqrt(sum(d[g == p].var(ddof=1) / (g == p).sum() for p in prompts)) / P
    # per token: Σ_p E[H] / Σ_p E[L] under each model; delta method on the paired rows
    h1, l1, h0, l0 = (
        np.array([x[g == p].mean() for p in prompts])
        for x in (t1["entropy_sum"], t1["length"], t0["entropy_sum"], t0["length"])
    )
    r1, r0 = h1.sum() / l1.sum(), h0.sum() / l0.sum()
    psi = (t1["entropy_sum"] - r1 * t1["length"]) / l1.mean() - (t0["entropy_sum"] - r0 * t0["length"]) / l0.mean()
    se_tok = math.sqrt(sum(psi[g == p].var(ddof=1) / (g == p).sum() for p in prompts)) / P
    return {
        "delta": float(seq),
        "se": se,
        "delta_tok": float(r1 - r0),
        "se_tok": se_tok,
        "h0": float(np.mean(h0)),
        "h1": float(np.mean(h1)),
        "h0_tok": float(r0),
        "h1_tok": float(r1),
    }


def replicate_estimates(p0: dict, p1: dict, rows: np.ndarray) -> dict:
    """Every method on one sample set (row indices of the pool): {method: (value, se, ci_lo, ci_hi)}
    plus the diagnostics and the headline policy's verdict."""
    from isdelta.estimators import estimate, estimate_tokens, headline
    from isdelta.estimators.groups import make_groups
    from isdelta.estimators.psis import pooled_khat
    from isdelta.estimators.weights import khat_threshold

    a = {k: v[rows] for k, v in p0.items()}
    b = {k: v[rows] for k, v in p1.items()}
    out, out_tok = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (a["logp"], b["logp"], a["length"], a["group"])
        for method, kw in (("snis", {"weights": "none"}), ("snis_psis", {"weights": "psis"})):
            e = estimate(*args, **kw)
            out[method] = e.delta
            out_tok[method] = e.delta_tok
        rb = estimate(
            *args, entropy_sum0=a["entropy_sum"], entropy_sum1=b["entropy_sum"], weights="psis", stopped=a["stopped"]
        )
        out["snis_rb"] = rb.delta_rb
        out_tok["snis_rb"] = rb.delta_tok_rb
        toks = {}
        for m in ("cv", "pd", "pd_sn"):
            toks[m] = estimate_tokens(
                a["token_logp"],
                b["token_logp"],
                a["token_entropy"],
                b["token_entropy"],
                a["mask"],
                a["group"],
                method=m,
            )
            out[m] = toks[m].delta
            out_tok[m] = toks[m].delta_tok
        verdict = headline(rb, toks["cv"], toks["pd"], toks["pd_sn"])
        base = without_sequence_check(lambda: headline(rb, toks["cv"], toks["pd"], toks["pd_sn"]))
        grid = truth_long.threshold_grid(lambda: headline(rb, toks["cv"], toks["pd"], toks["pd_sn"]))
    res = {m: (e.value, e.se, e.ci_low, e.ci_high, out_tok[m].value, out_tok[m].se) for m, e in out.items()}
    order = np.argsort(a["group"], kind="stable")  # the pool is prompt-major already
    groups = make_groups(*np.unique(a["group"], return_inverse=True)[::-1])
    k_pooled, S = pooled_khat((b["logp"] - a["logp"])[order], groups)
    diag = {
        "ess_frac": rb.ess_frac,
        "khat": rb.khat,
        "khat_threshold": rb.khat_threshold,
        "kl": rb.kl,
        "kl_max": rb.kl_max,
        "mean_ratio_min": rb.mean_ratio_min,
        "mean_ratio_max": rb.mean_ratio_max,
        "prefix_ess_frac": toks["cv"].prefix_ess_frac_min,
        "prefix_ess_frac_sn": toks["pd_sn"].prefix_ess_frac_min,
        "khat_pooled": k_pooled,
        "khat_pooled_threshold": float(khat_threshold(S)),
        "h0": rb.h0_rb.value,
        "h0_tok": rb.h0_tok_rb.value,
        "g_min": rb.g_min,
        **{f"terms_khat_{m}": _nan(toks[m].terms_khat) for m in ("cv", "pd", "pd_sn")},
        **{f"terms_khat_tok_{m}": _nan(toks[m].terms_khat_tok) for m in ("cv", "pd", "pd_sn")},
        "mean_length0": toks["pd"].mean_length0,
        "mean_length1": toks["pd"].mean_length1,
        "length_ess_frac": length_ess_frac(a, b),
        "max_length": int(a["mask"].shape[1]),
    }
    return {"estimates": res, "diag": diag, "verdict": slim(verdict), "base": slim(base), "grid": grid}


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def slim(h) -> dict:
    """A headline's verdicts, method, reason and picked estimates (not every check)."""
    d = h.to_dict()
    return {k: d[k] for k in ("valid", "valid_tok", "method", "reason", "delta", "delta_tok")}


def without_sequence_check(call):
    """``call()`` with the checks issue 26 added switched off: the verdict the policy gave before
    it, for calibrating their thresholds."""
    with truth_long.thresholds(*(math.inf for _ in truth_long.NAMES)):
        return call()


def length_ess_frac(a: dict, b: dict) -> float:
    """Smallest per-prompt ESS / G of the length statistic: (Σ_i r_i L_i)² / Σ_i (r_i L_i)² over its
    value at r ≡ 1 (1 when the weights do not move the lengths' mass; small when a few long or
    short rows carry the weighted length)."""
    out = []
    for p in np.unique(a["group"]):
        sel = a["group"] == p
        lr = (b["logp"] - a["logp"])[sel]
        r, L = np.exp(lr - lr.max()), a["length"][sel].astype(float)
        ess_w = (r * L).sum() ** 2 / max(((r * L) ** 2).sum(), 1e-300)
        ess_1 = L.sum() ** 2 / max((L**2).sum(), 1e-300)
        out.append(ess_w / ess_1)
    return float(min(out))


def phase_analyse(args) -> None:
    out = Path(args.out)
    names = [n for n in (args.steps or suite(args)[1]) if (out / f"pool_{n}.npz").exists()]
    with np.load(out / "pool_p0.npz") as z:
        pool0 = dict(z)
    with np.load(out / "truth_p0.npz") as z:
        truth0 = dict(z)
    lines, rows_out, replicates = [], [], []
    g = pool0["group"]
    prompts = np.unique(g)
    M = int((g == prompts[0]).sum())
    for name in names:
        pool1, truth1 = load(out, name)
        truth = truth_delta(truth0, truth1)
        for G in args.G:
            n_sets = M // G
            per_method = {m: [] for m in METHODS}
            verdicts = []
            for r in range(n_sets):
                rows = np.concatenate([np.flatnonzero(g == p)[r * G : (r + 1) * G] for p in prompts])
                rep = replicate_estimates(pool0, pool1, rows)
                verdicts.append(rep)
                replicates.append({"step": name, "G": G, "set": r, "length": args.new_tokens, "truth": truth, **rep})
                for m in METHODS:
                    per_method[m].append(rep["estimates"][m])
            summary = summarise(name, G, truth, per_method, verdicts)
            summary["length"] = args.new_tokens
            rows_out.append(summary)
            print(json.dumps({k: summary[k] for k in ("step", "G", "truth", "sets")}), file=sys.stderr, flush=True)
    results = ROOT / "benchmarks" / "results"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    tag = "truth" if args.suite == "math" else f"truth_long_L{args.new_tokens}"
    with open(results / f"{tag}.jsonl", "w") as f:
        for r in rows_out:
            f.write(json.dumps({**r, "commit": commit}) + "\n")
    kept = [out / "replicates.jsonl"]
    if args.suite == "long":  # kept in results/ too: `lengths` recombines them without the arrays
        kept.append(results / f"truth_long_replicates_L{args.new_tokens}.jsonl")
    for path in kept:
        with open(path, "w") as f:
            for r in replicates:
                f.write(json.dumps(r, default=float) + "\n")
    lines = map_markdown(rows_out) + ["", "Every method (coverage without and with the truth's SE):", ""]
    lines += markdown(rows_out)
    (results / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summarise(name: str, G: int, truth: dict, per_method: dict, verdicts: list[dict]) -> dict:
    """Coverage, bias in SE units, SD / mean SE and readability per method; the policy's choices."""
    z = 1.959963984540054
    t, t_se = truth["delta"], truth["se"]
    methods = {}
    for m, ests in per_method.items():
        v = np.array([e[0] for e in ests])
        se = np.array([e[1] for e in ests])
        ok = np.isfinite(v) & np.isfinite(se)
        v, se = v[ok], se[ok]
        covers = np.abs(v - t) <= z * se
        covers_joint = np.abs(v - t) <= z * np.sqrt(se**2 + t_se**2)
        vt = np.array([e[4] for e in ests])[ok]
        st = np.array([e[5] for e in ests])[ok]
        covers_tok = np.abs(vt - truth["delta_tok"]) <= z * np.sqrt(st**2 + truth["se_tok"] ** 2)
        methods[m] = {
            "coverage_tok_joint": float(covers_tok.mean()) if len(v) else None,
            "sd_over_se_tok": float(vt.std(ddof=1) / st.mean()) if len(v) > 1 else None,
            "n": int(ok.sum()),
            "coverage": float(covers.mean()) if len(v) else None,
            "coverage_joint": float(covers_joint.mean()) if len(v) else None,
            "bias_se": float((v.mean() - t) / se.mean()) if len(v) else None,
            "sd_over_se": float(v.std(ddof=1) / se.mean()) if len(v) > 1 else None,
            "mean_se": float(se.mean()) if len(v) else None,
            "mean": float(v.mean()) if len(v) else None,
        }
    chosen = [rep["verdict"] for rep in verdicts]
    valid = [c for c in chosen if c["valid"]]
    by_method, chosen_se = {}, []
    for c in chosen:
        if c["valid"]:
            est = c["delta"]
            chosen_se.append(est["se"])
            by_method.setdefault(c["method"], []).append(
                abs(est["value"] - t) <= z * math.sqrt(est["se"] ** 2 + t_se**2)
            )
    diag = {k: float(np.nanmedian([rep["diag"][k] for rep in verdicts])) for k in verdicts[0]["diag"]}
    levels = {key: level_summary([rep[key] for rep in verdicts], truth) for key in ("verdict", "base")}
    return {
        "levels": levels,
        "step": name,
        "G": G,
        "sets": len(verdicts),
        "truth": truth,
        "methods": methods,
        "diag_median": diag,
        "policy": {
            "valid_frac": len(valid) / len(chosen),
            "methods": {m: {"n": len(c), "coverage_joint": float(np.mean(c))} for m, c in by_method.items()},
            "coverage_joint": float(np.mean([x for c in by_method.values() for x in c])) if valid else None,
            "mean_se": float(np.mean(chosen_se)) if chosen_se else None,
            "reasons": sorted({c["reason"].split(":")[0] for c in chosen if not c["valid"]}),
        },
    }


def level_summary(chosen: list[dict], truth: dict) -> dict:
    """The policy's two verdicts on the sets of one step × G: how often each level is valid, how
    often its interval covers the truth (joint with the truth's SE), the mean SE, the methods."""
    z = 1.959963984540054
    out = {}
    for level, key, t, t_se in (("seq", "valid", "delta", "se"), ("tok", "valid_tok", "delta_tok", "se_tok")):
        picked = [(c["method"], c[t]) for c in chosen if c[key] and c[t] is not None]
        hits = [abs(e["value"] - truth[t]) <= z * math.hypot(e["se"], truth[t_se]) for _, e in picked]
        by_method: dict = {}
        for (m, _), h in zip(picked, hits):
            by_method.setdefault(m, []).append(h)
        out[level] = {
            "valid_frac": len(picked) / len(chosen),
            "covered": int(sum(hits)),
            "n_valid": len(picked),
            "coverage_joint": float(np.mean(hits)) if hits else None,
            "mean_se": float(np.mean([e["se"] for _, e in picked])) if picked else None,
            "methods": {m: {"n": len(h), "coverage_joint": float(np.mean(h))} for m, h in by_method.items()},
        }
    return out


def map_markdown(rows: list[dict]) -> list[str]:
    """The user's map: per step × G, is ΔH readable, is the CI honest, which method."""
    out = [
        "| step (update, optimizer, lr) | KL | truth ΔH ± SE | G | ESS/S | headline valid | chosen: coverage | "
        r"SE / \|ΔH\| | smallest honest SE (coverage ≥ 90%, SD/SE ≤ 1.2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, d, p = r["truth"], r["diag_median"], r["policy"]
        chosen = ", ".join(f"{m} {v['n']}: {v['coverage_joint']:.0%}" for m, v in p["methods"].items()) or "–"
        readable = f"{p['mean_se'] / abs(t['delta']):.2f}" if p["mean_se"] else "–"
        honest = [
            (v["mean_se"], m)
            for m, v in r["methods"].items()
            if v["n"] > 1 and v["coverage_joint"] >= 0.9 and v["sd_over_se"] <= 1.2
        ]
        best = f"{min(honest)[1]} ({min(honest)[0]:.2f})" if honest else "none ≥ 90%"
        out.append(
            f"| {r['step']} | {d['kl']:.3g} | {t['delta']:+.2f} ± {t['se']:.2f} | {r['G']} | {d['ess_frac']:.2f} | "
            f"{p['valid_frac']:.0%} | {chosen} | {readable} | {best} |"
        )
    return out


def markdown(rows: list[dict]) -> list[str]:
    out = [
        "| step | G | sets | truth ΔH ± SE (nats) | ESS/S | k̂ | KL | method: coverage (joint) · bias/SE · SD/SE | "
        "policy: valid · chosen (coverage) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, d, p = r["truth"], r["diag_median"], r["policy"]
        meth = "<br>".join(
            f"{m}: {v['coverage']:.0%} ({v['coverage_joint']:.0%}) · {v['bias_se']:+.2f} · {v['sd_over_se']:.2f}"
            for m, v in r["methods"].items()
            if v["n"] > 1
        )
        chosen = ", ".join(f"{m} {v['n']} ({v['coverage_joint']:.0%})" for m, v in p["methods"].items()) or "–"
        out.append(
            f"| {r['step']} | {r['G']} | {r['sets']} | {t['delta']:+.3f} ± {t['se']:.3f} | {d['ess_frac']:.2f} | "
            f"{d['khat']:.2f} | {d['kl']:.3g} | {meth} | {p['valid_frac']:.0%} · {chosen} |"
        )
    return out


# ---------------------------------------------------------------------------- diagnostics
RULES = {  # warning rule -> does it fire on this sample set's diagnostics
    "k̂ per fit (worst; per prompt when G ≥ 25)": lambda d: d["khat"] > d["khat_threshold"],
    "k̂ pooled over prompts (ratio / prompt mean)": lambda d: d["khat_pooled"] > d["khat_pooled_threshold"],
    "k̂ pooled, and ESS/S < 0.5": lambda d: d["khat_pooled"] > d["khat_pooled_threshold"] and d["ess_frac"] < 0.5,
    "k̂ per fit, and ESS/S < 0.5 (isdelta's k̂ warning)": lambda d: (
        d["khat"] > d["khat_threshold"] and d["ess_frac"] < 0.5
    ),
    "ESS/S < 0.1 (isdelta's warning)": lambda d: d["ess_frac"] < 0.1,
    "ESS/S < 0.3": lambda d: d["ess_frac"] < 0.3,
    "mean ratio outside [0.5, 2] (isdelta's warning)": lambda d: d["mean_ratio_min"] < 0.5 or d["mean_ratio_max"] > 2.0,
    "G < exp(KL_max)": lambda d: d["g_min"] < math.exp(min(d["kl_max"], 700)),
}


def phase_calibrate(args) -> None:
    """False-alarm and detection rates of each warning rule: steps × G where SNIS's CI covers the
    truth at ≥ 90% are "light", at ≤ 75% "heavy" (the rest ambiguous, left out)."""
    reps = [json.loads(x) for x in (Path(args.out) / "replicates.jsonl").read_text().splitlines()]
    z = 1.959963984540054
    cover: dict = {}
    for r in reps:
        t, (v, se) = r["truth"], r["estimates"]["snis_rb"][:2]
        cover.setdefault((r["step"], r["G"]), []).append(abs(v - t["delta"]) <= z * math.hypot(se, t["se"]))
    kind = {k: ("light" if np.mean(c) >= 0.9 else "heavy" if np.mean(c) <= 0.75 else None) for k, c in cover.items()}
    lines = ["| G | rule | false alarms on light steps | detection on heavy steps |", "|---|---|---|---|"]
    for G in sorted({r["G"] for r in reps}):
        for name, fires in {**RULES, "headline not valid": None}.items():
            rate = {}
            for k in ("light", "heavy"):
                sel = [r for r in reps if r["G"] == G and kind[(r["step"], r["G"])] == k]
                hits = [(not r["verdict"]["valid"]) if fires is None else bool(fires(r["diag"])) for r in sel]
                rate[k] = f"{np.mean(hits):.0%} of {len(hits)}" if hits else "–"
            lines.append(f"| {G} | {name} | {rate['light']} | {rate['heavy']} |")
    steps = {k: (v, f"{np.mean(cover[k]):.0%}") for k, v in kind.items()}
    lines += [
        "",
        "Steps × G classified (SNIS-RB coverage): "
        + "; ".join(f"{s} G={G}: {v} ({c})" for (s, G), (v, c) in sorted(steps.items())),
    ]
    (ROOT / "benchmarks" / "results" / "truth_diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------- policy thresholds
def policy_replica(rep: dict, cv_ess: float, pd_ess: float, sn_ess: float, snis_ess: float, band: float) -> str:
    """The method isdelta.estimators.headline would choose on a stored sample set, for candidate
    thresholds ("none": not valid; a threshold above 1 leaves the method out); mirrors its checks
    (k̂ > 1, coverage, per-method, bounds) with the chain cv → pd → pd_sn → SNIS."""
    d, e = rep["diag"], rep["estimates"]
    lo = min(d["mean_ratio_min"], 1.0 / max(d["mean_ratio_max"], 1e-300))
    if (math.isfinite(d["khat"]) and d["khat"] > 1.0 and d["ess_frac"] < 0.5) or not lo >= 1.0 / band:
        return "none"

    def bounded(m: str) -> bool:
        v, se, _, _, vt, set_ = e[m]
        ok = all(math.isfinite(x) for x in (v, se, vt, set_))
        return ok and v >= -d["h0"] and vt >= -d["h0_tok"]

    for m, thr in (("cv", cv_ess), ("pd", pd_ess), ("pd_sn", sn_ess)):
        if d["prefix_ess_frac"] >= thr and bounded(m):
            return m
    if d["ess_frac"] >= snis_ess and d["g_min"] >= math.exp(min(d["kl_max"], 700)) and bounded("snis_rb"):
        return "snis_rb"
    return "none"


def phase_policy(args) -> None:
    """Grid of the policy's thresholds on the stored sample sets: per candidate, the fraction of
    sets called valid and the worst per-(step, G) coverage of what it chose (joint with the
    truth's SE), so the thresholds can be chosen where coverage is 90–98% wherever valid."""
    reps = [json.loads(x) for x in (Path(args.out) / "replicates.jsonl").read_text().splitlines()]
    z = 1.959963984540054
    rows = []
    for cv_ess in (0.5, 0.7, 0.8, 0.9, 0.95, 1.01):
        for pd_ess in (0.3, 0.4, 0.5, 0.7, 0.9, 1.01):
            for sn_ess in (0.2, 0.3, 0.4, 0.5, 0.7, 1.01):
                for snis_ess in (0.1, 0.3, 0.5, 1.01):
                    for band in (1.5, 2.0, 3.0):
                        cells: dict = {}
                        chosen: dict = {}  # (step, G, method) -> [covers]
                        for r in reps:
                            m = policy_replica(r, cv_ess, pd_ess, sn_ess, snis_ess, band)
                            c = cells.setdefault((r["step"], r["G"]), {"n": 0, "valid": 0, "cover": 0})
                            c["n"] += 1
                            if m != "none":
                                v, se = r["estimates"][m][:2]
                                hit = abs(v - r["truth"]["delta"]) <= z * math.hypot(se, r["truth"]["se"])
                                c["valid"] += 1
                                c["cover"] += hit
                                chosen.setdefault((r["step"], r["G"], m), []).append(hit)
                        covs = [c["cover"] / c["valid"] for c in cells.values() if c["valid"] >= 4]
                        by_method = [np.mean(h) for h in chosen.values() if len(h) >= 5]
                        rows.append(
                            {
                                "cv_ess": cv_ess,
                                "pd_ess": pd_ess,
                                "sn_ess": sn_ess,
                                "snis_ess": snis_ess,
                                "band": band,
                                "valid": sum(c["valid"] for c in cells.values()) / len(reps),
                                "worst_cover": min(covs) if covs else None,
                                "worst_method_cover": float(min(by_method)) if by_method else None,
                                "pooled_cover": sum(c["cover"] for c in cells.values())
                                / max(1, sum(c["valid"] for c in cells.values())),
                            }
                        )
    good = sorted(
        (r for r in rows if r["worst_method_cover"] is not None and r["worst_method_cover"] >= 0.9),
        key=lambda r: -r["valid"],
    )
    for r in good[:15] or sorted(rows, key=lambda r: -(r["worst_cover"] or 0))[:15]:
        print(json.dumps(r))


# ---------------------------------------------------------------------------- bf16
def phase_bf16(args) -> None:
    """An AdamW step at lr 1e-6 on fp32 weights (the trainer's master copy), scored four ways on the
    same 16 samples per prompt: fp32 weights in fp32 (the reference); bf16 copies of p0 and p1 in
    bf16 (what a trainer scoring a bf16 copy sees); the same bf16 copies computed in fp32 (what
    upcasting a bf16 model buys); fp32 weights under a bf16 autocast (mixed-precision forward)."""
    import contextlib

    import torch

    from isdelta.engine import LogitTransform, load_model, sample
    from isdelta.estimators import estimate, estimate_tokens

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model0, tok = load_model("smollm2-135m-instruct")
    prompts = [chat(r["prompt"]) for r in records()[: args.prompts]]
    smp = sample(
        model0,
        tok,
        prompts,
        num_samples=16,
        transform=LogitTransform(),
        max_new_tokens=args.new_tokens,
        seed=POOL_SEED,
        progress=False,
    )
    STEPS["sft-adamw-1e-6"] = ("sft", "adamw", 1e-6)
    model1, _ = make_p1(model0, "sft-adamw-1e-6", train_batches(model0, tok, out, args))
    bf16 = [copy.deepcopy(m).to(torch.bfloat16) for m in (model0, model1)]
    variants = {
        "fp32 weights, fp32 compute": ((model0, model1), contextlib.nullcontext),
        "bf16 weights, bf16 compute": (tuple(bf16), contextlib.nullcontext),
        "bf16 weights, fp32 compute": (tuple(copy.deepcopy(m).float() for m in bf16), contextlib.nullcontext),
        "fp32 weights, bf16 autocast": ((model0, model1), lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    report = {}
    for name, ((m0, m1), ctx) in variants.items():
        moved = sum(int((a != b).sum()) for a, b in zip(m0.parameters(), m1.parameters()))
        total = sum(p.numel() for p in m0.parameters())
        key = name.replace(" ", "_").replace(",", "")
        with ctx():
            s0 = score(m0, smp.rollouts, out / f"bf16_{key}_p0.npz")
            s1 = score(m1, smp.rollouts, out / f"bf16_{key}_p1.npz")
            s00 = score(m0, smp.rollouts, out / f"bf16_{key}_p0_again.npz")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = dict(entropy_sum0=s0["entropy_sum"], entropy_sum1=s1["entropy_sum"])
            e = estimate(s0["logp"], s1["logp"], s0["length"], s0["group"], **kw)
            t = estimate_tokens(
                s0["token_logp"], s1["token_logp"], s0["token_entropy"], s1["token_entropy"], s0["mask"], s0["group"]
            )
            same = estimate(s0["logp"], s00["logp"], s0["length"], s0["group"])
        d = np.abs((s1["token_logp"] - s0["token_logp"])[s0["mask"]])
        report[name] = {
            "weights_changed_frac": moved / total,
            "delta_rb": e.delta_rb.to_dict(),
            "cv": t.delta.to_dict(),
            "kl": e.kl,
            "token_logratio_abs_mean": float(d.mean()),
            "token_logratio_abs_max": float(d.max()),
            "direct": t.direct.to_dict(),
            "p1_is_p0_delta": same.delta.value,
        }
        print(
            name,
            json.dumps({k: v for k, v in report[name].items() if not isinstance(v, dict)}),
            f"ΔH_rb {e.delta_rb}",
            f"cv {t.delta}",
            file=sys.stderr,
            flush=True,
        )
    (ROOT / "benchmarks" / "results" / "truth_bf16.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("sample", "analyse", "calibrate", "policy", "bf16", "lengths"))
    ap.add_argument(
        "--suite",
        choices=("math", "long"),
        default="math",
        help="math: 20-token arithmetic answers; long: writing prompts (truth_long.py)",
    )
    ap.add_argument(
        "--out", default=None, help="arrays (resumable); default runs/truth, or runs/truth_long/L<new-tokens>"
    )
    ap.add_argument("--steps", nargs="*", help=f"subset of {list(STEPS)}")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--truth", type=int, default=256, help="truth samples per prompt and model")
    ap.add_argument("--pool", type=int, default=512, help="p0 samples per prompt, cut into sets of G")
    ap.add_argument("--G", type=int, nargs="*", default=[8, 16, 64])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "runs" / ("truth" if args.suite == "math" else f"truth_long/L{args.new_tokens}"))
    phases = {
        "sample": phase_sample,
        "analyse": phase_analyse,
        "calibrate": phase_calibrate,
        "policy": phase_policy,
        "bf16": phase_bf16,
        "lengths": truth_long.phase_lengths,
    }
    phases[args.phase](args)


if __name__ == "__main__":
    main()
