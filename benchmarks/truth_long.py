"""The long-answer suite of ``bench_truth.py`` (issue 26): prompts that make SmolLM2 write, and the
same update steps measured on completions of 128 and of 512 tokens.

The update steps do not depend on the measured length: every p1 is one optimizer step from the
same p0 on the same two batches, so a step's row at 128 tokens and at 512 tokens is the same
model, read on shorter or longer completions.

- SFT: one completion per writing prompt (8 prompts), drawn from p0 at temperature 0.7 and up to
  512 tokens: fine-tuning on the model's own sharpened samples (rejection-sampling fine-tuning
  and self-distillation do this), which lowers the entropy.
- REINFORCE: 8 completions of up to 192 tokens per step-by-step arithmetic prompt (the 12 of the
  shipped ``math.jsonl``), rewarded by ``answer_match``, group-mean baseline.

The entropy is measured on the first ``--prompts`` writing prompts, as chat messages,
temperature 1, no top-k / top-p.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from pathlib import Path

import numpy as np

LONG_PROMPTS = (
    "Explain in detail why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "A farmer has 17 sheep and buys three times as many goats as sheep. He then sells 12 goats. "
    "How many animals does he have now? Think step by step.",
    "Describe how a bicycle works, part by part.",
    "Explain how vaccines train the immune system.",
    "Write a letter to a friend describing your last holiday.",
    "A train travels at 60 km/h for 2.5 hours and then at 80 km/h for 1.5 hours. How far does it "
    "travel in total? Explain each step.",
    "What were the main causes of the French Revolution? Explain each of them.",
)
# name: (loss, optimizer, lr); ordered from the smallest step, so a partial run has the light end
LONG_STEPS = {
    "sft-adamw-1e-6": ("sft", "adamw", 1e-6),
    "sft-adamw-3e-6": ("sft", "adamw", 3e-6),
    "sft-sgd-1e-3": ("sft", "sgd", 1e-3),
    "rl-adamw-3e-6": ("reinforce", "adamw", 3e-6),
    "sft-adamw-1e-5": ("sft", "adamw", 1e-5),
}
SFT_TOKENS, SFT_TEMPERATURE, RL_TOKENS, RL_SAMPLES = 512, 0.7, 192, 8
STEP_BY_STEP = " Think step by step, then give the final number."


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompts(n: int) -> list[list[dict]]:
    return [chat(p) for p in LONG_PROMPTS[:n]]


def train_batches(model0, tok, root: Path, records: list[dict], seed: int, draw):
    """(sft rollouts, (rl rollouts, rewards)), saved under ``root`` and shared by every length;
    ``draw`` is ``bench_truth.draw`` (samples, saved and reloaded)."""
    from isdelta.engine import LogitTransform
    from isdelta.training import REWARDS

    root.mkdir(parents=True, exist_ok=True)
    sft_prompts = [chat(p) for p in LONG_PROMPTS]
    cool = LogitTransform(temperature=SFT_TEMPERATURE)
    sft = draw(model0, tok, sft_prompts, 1, seed, SFT_TOKENS, root / "train_sft.pt", cool)
    rl_prompts = [chat(r["prompt"] + STEP_BY_STEP) for r in records]
    rl = draw(model0, tok, rl_prompts, RL_SAMPLES, seed, RL_TOKENS, root / "train_rl.pt")
    answers = [records[g]["answer"] for g in rl.rollouts.group.tolist()]
    rewards = np.array([REWARDS["answer_match"](t, str(a)) for t, a in zip(rl.texts, answers)])
    return sft.rollouts, (rl.rollouts, rewards)


# ---------------------------------------------------------------------------- the policy's length checks
# candidate thresholds of the checks issue 26 added (isdelta/estimators/checks.py), tried on every
# stored sample set: (TERMS_KHAT, TERMS_KHAT_TOK); inf switches a check off
KHAT_SEQ = (0.5, 0.7, math.inf)
KHAT_TOK = (0.7, math.inf)
SHIFT = (0.02, 0.05, 0.1, math.inf)
NAMES = ("TERMS_KHAT", "TERMS_KHAT_TOK", "LENGTH_SHIFT")
Z95 = 1.959963984540054
RESULTS = Path(__file__).resolve().parent / "results"


def grid_key(seq: float, tok: float, shift: float) -> str:
    return f"seq{seq:g}_tok{tok:g}_shift{shift:g}"


@contextlib.contextmanager
def thresholds(*values: float):
    """The issue-26 thresholds (``NAMES``, in order) set to ``values`` inside the block, restored
    after (inf switches a check off)."""
    from isdelta.estimators import checks

    keep = {k: getattr(checks, k) for k in NAMES}
    try:
        for k, v in zip(NAMES, values):
            setattr(checks, k, v)
        yield
    finally:
        for k, v in keep.items():
            setattr(checks, k, v)


def threshold_grid(call) -> dict:
    """The headline ``call()`` under every candidate threshold: {key: (valid, valid_tok, method,
    ΔH, SE, ΔH per token, SE)} (None where that level is not valid)."""
    out = {}
    for combo in itertools.product(KHAT_SEQ, KHAT_TOK, SHIFT):
        with thresholds(*combo):
            h = call()
        d = (h.delta.value, h.delta.se) if h.valid else (None, None)
        t = (h.delta_tok.value, h.delta_tok.se) if h.valid_tok else (None, None)
        out[grid_key(*combo)] = (h.valid, h.valid_tok, h.method, *d, *t)
    return out


def _covers(v, se, truth: float, truth_se: float) -> bool:
    return abs(v - truth) <= Z95 * math.hypot(se, truth_se)


def cells_of(reps: list[dict], key: str) -> dict:
    """Per (length, step, G): sets, and per level the valid sets and how many covered (joint)."""
    cells: dict = {}
    for r in reps:
        t = r["truth"]
        valid, valid_tok, method, d, se, dt, set_ = r["grid"][key]
        c = cells.setdefault((r["length"], r["step"], r["G"]), {"n": 0, "seq": [], "tok": [], "methods": {}})
        c["n"] += 1
        c.setdefault("se_seq", [])
        c.setdefault("se_tok", [])
        if valid:
            c["seq"].append(_covers(d, se, t["delta"], t["se"]))
            c["se_seq"].append(se)
        if valid_tok:
            c["tok"].append(_covers(dt, set_, t["delta_tok"], t["se_tok"]))
            c["se_tok"].append(set_)
            c["methods"][method] = c["methods"].get(method, 0) + 1
    return cells


def phase_lengths(args) -> None:
    """The long-answer table (length × step × G) and the calibration of the length checks, from
    every ``replicates.jsonl`` under ``runs/truth_long/L*``: results/truth_long.{md,json}."""
    root = Path(args.out).parent if Path(args.out).name.startswith("L") else Path(args.out)
    reps, have = [], set()
    for path in sorted(root.glob("L*/replicates.jsonl")):
        reps += [json.loads(x) for x in path.read_text().splitlines()]
        have.add(path.parent.name)
    # a length whose arrays are gone (a fresh checkout): the replicates analyse kept in results/
    for path in sorted(RESULTS.glob("truth_long_replicates_L*.jsonl")):
        if path.stem.rsplit("_", 1)[-1] not in have:
            reps += [json.loads(x) for x in path.read_text().splitlines()]
    base_key = grid_key(math.inf, math.inf, math.inf)  # no length check: the policy before issue 26
    base = cells_of(reps, base_key)
    # a level of a cell is "honest" (light) where the base policy's intervals covered ≥ 90% of its
    # valid sets, "broken" (heavy) where ≤ 80%: false alarms are refusals on light cells
    truth_se = {(r["length"], r["step"], r["G"]): r["truth"] for r in reps}
    kind = {
        lvl: {
            k: _kind(c[lvl], c[f"se_{lvl}"], truth_se[k]["se" if lvl == "seq" else "se_tok"]) for k, c in base.items()
        }
        for lvl in ("seq", "tok")
    }
    rows = []
    for combo in itertools.product(KHAT_SEQ, KHAT_TOK, SHIFT):
        key = grid_key(*combo)
        cells = cells_of(reps, key)
        row = {"key": key, "khat": combo[0], "khat_tok": combo[1], "shift": combo[2]}
        for lvl in ("seq", "tok"):
            resolved = [cells[k] for k in cells if kind[lvl][k] != "truth-limited"]  # the truth can judge them
            cov = [np.mean(c[lvl]) for c in resolved if len(c[lvl]) >= 4]
            row[f"{lvl}_worst_cover"] = float(min(cov)) if cov else None
            row[f"{lvl}_pooled_cover"] = _rate(sum(sum(c[lvl]) for c in resolved), sum(len(c[lvl]) for c in resolved))
            row[f"{lvl}_valid"] = sum(len(c[lvl]) for c in cells.values()) / len(reps)
            light = [k for k, v in kind[lvl].items() if v == "light"]
            lost = sum(len(base[k][lvl]) - len(cells[k][lvl]) for k in light)
            row[f"{lvl}_false_alarm"] = _rate(lost, sum(len(base[k][lvl]) for k in light))
            heavy = [k for k, v in kind[lvl].items() if v == "heavy"]
            caught = sum(len(base[k][lvl]) - len(cells[k][lvl]) for k in heavy)
            row[f"{lvl}_detection"] = _rate(caught, sum(len(base[k][lvl]) for k in heavy))
        rows.append(row)
    results = RESULTS
    (results / "truth_long_thresholds.json").write_text(json.dumps(rows, indent=1))
    from isdelta.estimators import checks

    chosen = grid_key(checks.TERMS_KHAT, checks.TERMS_KHAT_TOK, checks.LENGTH_SHIFT)
    lines = table(reps, cells_of(reps, chosen), base, chosen)
    lines += ["", "Thresholds (every candidate; worst cell and pooled coverage over the cells the truth can judge, "
              "its SE below the estimates'; false alarms: sets refused on cells the policy before issue 26 "
              "read honestly, coverage ≥ 90%; detection: on cells it read at ≤ 80%):", "",
              "| k̂ of the terms per seq ≤ | per token ≤ | length shift ≤ | per seq: valid · worst cell · pooled · false alarms · "
              "detection | per token: valid · worst cell · pooled · false alarms · detection |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [
            f"{r[f'{lvl}_valid']:.0%} · {_pct(r[f'{lvl}_worst_cover'])} · {_pct(r[f'{lvl}_pooled_cover'])} · "
            f"{_pct(r[f'{lvl}_false_alarm'])} · {_pct(r[f'{lvl}_detection'])}"
            for lvl in ("seq", "tok")
        ]
        mark = " (chosen)" if r["key"] == chosen else ""
        lines.append(f"| {r['khat']:g}{mark} | {r['khat_tok']:g} | {r['shift']:g} | {cells[0]} | {cells[1]} |")
    lines += ["", "Cells: " + "; ".join(f"L{k[0]} {k[1]} G={k[2]}: seq {kind['seq'][k]}, tok {kind['tok'][k]}"
                                       for k in sorted(base))]  # fmt: skip
    (results / "truth_long.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _kind(hits: list, ses: list, truth_se: float) -> str:
    """light (covered ≥ 90%), heavy (≤ 80%), between; "truth-limited" where the truth's SE exceeds
    the estimates' mean SE (one shared truth error then decides every set at once), "few" (< 4)."""
    if ses and truth_se > np.mean(ses):
        return "truth-limited"
    if len(hits) < 4:
        return "few"
    rate = float(np.mean(hits))
    return "light" if rate >= 0.9 else "heavy" if rate <= 0.8 else "between"


def _rate(k: float, n: float) -> float | None:
    return k / n if n else None


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def agreement(values: list[float], ses: list[float], truth: float, truth_se: float) -> tuple[float, float]:
    """(z, SD/SE) of a cell's valid sets: z of their mean against the truth, joint with the truth's
    SE (the sets are disjoint, so the mean's SE is their SD / √n), and the spread of the estimates
    over their mean reported SE. Where one truth error is shared by every set (truth-limited cells)
    coverage is a single draw; z and SD/SE still test the estimates' bias and their SEs."""
    if len(values) < 3:
        return math.nan, math.nan
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1))
    return float((v.mean() - truth) / math.hypot(truth_se, sd / math.sqrt(len(v)))), sd / float(np.mean(ses))


def table(reps: list[dict], cells: dict, base: dict, key: str) -> list[str]:
    """The user's map with a length axis: per (length, step, G) the truth, the step's size, and
    for each level whether the headline is valid, whether its interval covers (``†``: the truth's
    SE exceeds the estimates', coverage is then one shared draw), how readable, and the agreement of
    the valid sets' mean with the truth (z) and of their spread with their SEs (SD/SE)."""
    diag = {}
    for r in reps:
        diag.setdefault((r["length"], r["step"], r["G"]), []).append(r)
    out = [
        "| length | step | KL | ESS/S | mean L (p0) | truth ΔH per seq ± SE | per token ± SE | G | sets | "
        r"per seq: valid · covers · SE/\|ΔH\| | per token: valid · covers · SE/\|ΔH\| | "
        "z · SD/SE per seq | per token | methods | before issue 26, per seq: valid · covers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(cells, key=lambda k: (k[0], list(LONG_STEPS).index(k[1]) if k[1] in LONG_STEPS else 99, k[2])):
        rs, c, b = diag[k], cells[k], base[k]
        t = rs[0]["truth"]
        med = {name: float(np.nanmedian([r["diag"][name] for r in rs])) for name in ("kl", "ess_frac", "mean_length0")}
        level, agree = [], []
        for lvl, val, t_se, (iv, ie, ise) in (
            ("seq", "delta", "se", (0, 3, 4)),
            ("tok", "delta_tok", "se_tok", (1, 5, 6)),
        ):
            kept = [r["grid"][key] for r in rs if r["grid"][key][iv]]
            ses = [g[ise] for g in kept]
            readable = f"{np.mean(ses) / abs(t[val]):.2f}" if ses and t[val] != 0 else "–"
            mark = "†" if ses and t[t_se] > np.mean(ses) else ""  # the truth's SE above the estimates
            level.append(f"{len(c[lvl]) / c['n']:.0%} · {_pct(_rate(sum(c[lvl]), len(c[lvl])))}{mark} · {readable}")
            z, ratio = agreement([g[ie] for g in kept], ses, t[val], t[t_se])
            agree.append("–" if math.isnan(z) else f"{z:+.1f} · {ratio:.2f}")
        methods = ", ".join(f"{m} {n}" for m, n in sorted(c["methods"].items())) or "–"
        before = f"{len(b['seq']) / b['n']:.0%} · {_pct(_rate(sum(b['seq']), len(b['seq'])))}"
        out.append(
            f"| {k[0]} | {k[1]} | {med['kl']:.3g} | {med['ess_frac']:.2f} | {med['mean_length0']:.0f} | "
            f"{t['delta']:+.2f} ± {t['se']:.2f} | {t['delta_tok']:+.4f} ± {t['se_tok']:.4f} | {k[2]} | {c['n']} | "
            f"{level[0]} | {level[1]} | {agree[0]} | {agree[1]} | {methods} | {before} |"
        )
    return out
