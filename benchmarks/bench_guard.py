"""Steering entropy (issue 28) on SmolLM2 with TRL's GRPOTrainer: the guard's prediction of each
step's ΔH against the measured ΔH, and one GRPO run with and without the guard, beside TRL's own
adaptive entropy coefficient.

    python benchmarks/bench_guard.py run --lr 1e-5 --steps 8 --prompts 6 --generations 6 --max-tokens 24 \
        --fresh 4 --band -0.02 --entropy-coef-delta 0.05 --threads 1      # benchmarks/README.md's run
    python benchmarks/bench_guard.py calibrate --lrs 1e-6 3e-6 1e-5 3e-5 --steps 6
    python benchmarks/bench_guard.py report --lr 1e-5

Every step is read on ``--fresh`` new samples of p0 per prompt (``attach(trainer, fresh=k)``), not
on the rows it trains on, whose self-influence biases both readings (``bench_own_samples.py``).

``calibrate``: one GRPO run per learning rate with an observe-only guard (band (−inf, inf): it
predicts ΔH₁ of every step from AdamW's own direction and never scales), the monitor measuring
each step. ``run``: three arms from the same seed: ``free`` (the monitor and an observe-only
guard, so its steps are calibration points too), ``guard`` (band (``--band``, inf) per token) and
``trl_adaptive`` (``use_adaptive_entropy`` with the target at the free arm's starting per-token
entropy). Every step is appended to ``runs/guard/<arm>/steps.jsonl`` as it ends (an arm with all its steps is not rerun; an interrupted one restarts). ``report``
writes ``benchmarks/results/guard_calibration.md``, ``guard_runs.md`` and ``guard_runs.png``.

Data: the 12 arithmetic prompts of ``isdelta/data/math.jsonl`` as chat messages, rewarded by
``answer_match`` (the last number against the answer); AdamW, fresh samples every step
(``steps_per_generation`` = ``gradient_accumulation_steps``, one iteration), temperature 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, device_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("delta_tok", "delta_tok_se", "delta", "delta_se", "h0_tok", "h1_tok", "valid", "valid_tok", "kl",
        "ess_frac", "prefix_ess_frac", "method")  # fmt: skip
GUARD_KEYS = ("guard_scale", "guard_delta1", "guard_delta1_se", "guard_correction", "guard_trend",
              "guard_predicted", "guard_predicted_se", "guard_measured", "guard_used")  # fmt: skip
Z95 = 1.959963984540054


def records() -> list[dict]:
    text = (files("isdelta") / "data" / "math.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def reward(prompts, completions, answer, **kwargs) -> list[float]:
    from isdelta.training import answer_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [answer_match(t, a) for t, a in zip(texts, answer)]


def recorder(path: Path):
    """A TrainerCallback that appends each logged step (isdelta's keys, TRL's reward, entropy and
    entropy_coef) to ``path`` as one JSON line."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and any(k.startswith("entropy/") for k in logs):
                row = {"step": int(state.global_step), "time": time.time()}
                for k, v in logs.items():
                    if k.startswith("entropy/"):
                        row[k.removeprefix("entropy/")] = v
                    elif k in ("reward", "reward_std", "entropy", "entropy_coef"):
                        row[f"trl_{k}"] = v
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    return Recorder()


def arm(
    out: Path, name: str, args, *, lr: float, guard: dict | None = None, trl_extra: dict | None = None
) -> list[dict]:
    """One GRPO run from the same seed; its steps (read back when the arm already finished)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from isdelta.engine import load_model
    from isdelta.integrations.trl import attach

    path = out / name / "steps.jsonl"
    if path.exists():
        done = [json.loads(x) for x in path.read_text().splitlines()]
        if len(done) >= args.steps:
            return done[: args.steps]
        path.unlink()  # an interrupted arm restarts (TRL's optimizer state was not kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    recs = records()[: args.prompts]
    data = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": r["prompt"]}] for r in recs], "answer": [r["answer"] for r in recs]}
    )
    cfg = GRPOConfig(
        output_dir=str(out / name / "trainer"),
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_tokens,
        max_steps=args.steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        temperature=1.0,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,  # a 135M model fits without it; TRL turns it on by default
        seed=args.seed,
        **(trl_extra or {}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=data)
        attach(trainer, guard=guard, fresh=args.fresh)
        trainer.add_callback(recorder(path))
        t0 = time.perf_counter()
        trainer.train()
    print(f"[guard] {name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return [json.loads(x) for x in path.read_text().splitlines()]


def phase_calibrate(args) -> None:
    out = Path(args.out)
    for lr in args.lrs:
        arm(out, f"calibrate_lr{lr:g}", args, lr=lr, guard={"band": (-math.inf, math.inf)})


def phase_run(args) -> None:
    out = Path(args.out)
    # the free arm carries an observe-only guard: it never scales (band (−inf, inf)), so the run is
    # the unguarded one, and its steps are calibration points at the run's lr
    free = arm(out, "free", args, lr=args.lr, guard={"band": (-math.inf, math.inf)})
    target = args.entropy_target if args.entropy_target is not None else free[0]["h0_tok"]
    arm(out, "guard", args, lr=args.lr, guard={"band": (args.band, math.inf), "z": args.z})
    # TRL's coefficient starts at 0 and moves by entropy_coef_delta per step (0.005 by default,
    # ≤ 0.04 after 8 steps); --entropy-coef-delta scales it to the run's length
    adaptive = {"use_adaptive_entropy": True, "entropy_target": float(target), "entropy_coef": 0.0,
                "entropy_coef_delta": args.entropy_coef_delta}  # fmt: skip
    arm(out, "trl_adaptive", args, lr=args.lr, trl_extra=adaptive)


# ---------------------------------------------------------------------------- report
def calibration_fit(p: np.ndarray, m: np.ndarray, sp: np.ndarray, sm: np.ndarray) -> tuple[float, float, float]:
    """Measured m on predicted p (SEs sm, sp): the slope through the origin, R², and how often m
    lies in p ± 1.96 √(sp² + sm²) (NaN where too few points)."""
    slope = float(p @ m / (p @ p)) if len(p) and p @ p > 0 else math.nan
    r2 = float(np.corrcoef(p, m)[0, 1] ** 2) if len(p) > 2 else math.nan
    cover = float(np.mean(np.abs(m - p) <= Z95 * np.hypot(sp, sm))) if len(p) else math.nan
    return slope, r2, cover


def calibration_runs(out: Path, run_lr: float) -> dict[float, list[dict]]:
    """lr → steps of every observe-only run: the ``calibrate_lr*`` runs and the free arm."""
    paths = {float(p.parent.name[len("calibrate_lr") :]): p for p in out.glob("calibrate_lr*/steps.jsonl")}
    if (out / "free" / "steps.jsonl").exists() and run_lr not in paths:
        paths[run_lr] = out / "free" / "steps.jsonl"
    return {lr: [json.loads(x) for x in paths[lr].read_text().splitlines()] for lr in sorted(paths)}


def calibration_rows(out: Path, run_lr: float) -> list[dict]:
    rows = []
    for lr, steps in calibration_runs(out, run_lr).items():
        ok = [s for s in steps if s.get("valid_tok") == 1 and _finite(s.get("guard_delta1"))]
        p = np.array([s["guard_delta1"] for s in ok])
        m = np.array([s["delta_tok"] for s in ok])
        sp = np.array([s["guard_delta1_se"] for s in ok])
        sm = np.array([s["delta_tok_se"] for s in ok])
        slope, r2, cover = calibration_fit(p, m, sp, sm)
        rows.append({
            "lr": lr, "steps": len(steps), "valid": len(ok),
            "kl": _median(steps, "kl"), "ess": _median(steps, "ess_frac"), "prefix_ess": _median(steps, "prefix_ess_frac"),
            "delta1": float(np.mean(p)) if len(ok) else math.nan, "measured": float(np.mean(m)) if len(ok) else math.nan,
            "slope": slope, "r2": r2, "coverage": cover,
        })  # fmt: skip
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _median(steps: list[dict], key: str) -> float:
    v = [s[key] for s in steps if _finite(s.get(key))]
    return float(np.median(v)) if v else math.nan


def phase_report(args) -> None:
    out = Path(args.out)
    head, dirty = commit("benchmarks/bench_guard.py", "isdelta")
    where = f"commit {head}{' (uncommitted changes)' if dirty else ''}, {device_name()}"
    cal = calibration_rows(out, args.lr)
    lines = [
        f"ΔH₁ per token before each step (AdamW's direction) against the measured ΔH per token; {where}.", "",
        "| lr | steps | valid | KL (median) | ESS/S | prefix ESS/G | ΔH₁ (mean) | measured (mean) | "
        "slope measured/ΔH₁ | R² | 95% prediction interval covers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in cal:
        lines.append(
            f"| {r['lr']:g} | {r['steps']} | {r['valid']} | {r['kl']:.3g} | {r['ess']:.2f} | {r['prefix_ess']:.2f} | "
            f"{r['delta1']:+.4f} | {r['measured']:+.4f} | {r['slope']:.2f} | {r['r2']:.2f} | {r['coverage']:.0%} |"
        )
    (RESULTS / "guard_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    runs = {name: [json.loads(x) for x in (out / name / "steps.jsonl").read_text().splitlines()]
            for name in ("free", "guard", "trl_adaptive") if (out / name / "steps.jsonl").exists()}  # fmt: skip
    if not runs:
        return
    lines = [f"One GRPO run per arm, same seed; {where}.", "",
             "| arm | steps | valid per token | cumulative ΔH per token ± SE | last H per token | mean reward (last 5) | "
             "steps scaled by the guard | mean scale |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, steps in runs.items():
        ok = [s for s in steps if s.get("valid_tok") == 1]
        cum = sum(s["delta_tok"] for s in ok)
        se = math.sqrt(sum(s["delta_tok_se"] ** 2 for s in ok))
        last_h = next((s["h1_tok"] for s in reversed(ok)), math.nan)
        rew = np.mean([s.get("trl_reward", math.nan) for s in steps[-5:]])
        scales = [s["guard_scale"] for s in steps if _finite(s.get("guard_scale"))]
        acted = sum(x < 1 for x in scales)
        lines.append(
            f"| {name} | {len(steps)} | {len(ok)} | {cum:+.3f} ± {se:.3f} | {last_h:.3f} | {rew:.2f} | "
            f"{acted if scales else '–'} | {f'{np.mean(scales):.2f}' if scales else '–'} |"
        )
    (RESULTS / "guard_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(runs, RESULTS / "guard_runs.png")


def plot(runs: dict, path: Path) -> None:
    from isdelta.outputs import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for name, steps in runs.items():
        x = [s["step"] for s in steps]
        ok = [s.get("valid_tok") == 1 for s in steps]
        axes[0, 0].plot(x, [s.get("trl_entropy", math.nan) for s in steps], label=name)
        d = np.array([s["delta_tok"] if o else 0.0 for s, o in zip(steps, ok)])
        v = np.array([s["delta_tok_se"] ** 2 if o else 0.0 for s, o in zip(steps, ok)])
        cum, se = np.cumsum(d), np.sqrt(np.cumsum(v))
        axes[0, 1].plot(x, cum, label=name)
        axes[0, 1].fill_between(x, cum - Z95 * se, cum + Z95 * se, alpha=0.2)
        axes[1, 0].plot(x, [s.get("trl_reward", math.nan) for s in steps], label=name)
        if any(_finite(s.get("guard_scale")) for s in steps):
            axes[1, 1].plot(x, [s.get("guard_scale", math.nan) for s in steps], "o-", label=f"{name}: lr scale")
        if any(_finite(s.get("trl_entropy_coef")) for s in steps):
            axes[1, 1].plot(
                x, [s.get("trl_entropy_coef", math.nan) for s in steps], "s--", label=f"{name}: entropy_coef"
            )
    titles = ("per-token entropy of the batch (TRL's `entropy`)", "cumulative ΔH per token, 95% CI",
              "mean reward", "the guard's lr scale / TRL's entropy_coef")  # fmt: skip
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("calibrate", "run", "report"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "guard"))
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-6, 3e-6, 1e-5, 3e-5])
    ap.add_argument("--lr", type=float, default=1e-5, help="the run's learning rate")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--band", type=float, default=-0.01, help="the guard's lower edge, ΔH per token per step")
    ap.add_argument("--z", type=float, default=1.0)
    ap.add_argument(
        "--entropy-target", type=float, default=None, help="TRL's; default: the free arm's first H per token"
    )
    ap.add_argument(
        "--fresh",
        type=int,
        default=4,
        help="read each step on this many new samples of p0 per prompt (0: the trained rows)",
    )
    ap.add_argument("--entropy-coef-delta", type=float, default=0.005, help="TRL's adaptive step (its default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"calibrate": phase_calibrate, "run": phase_run, "report": phase_report}[args.phase](args)


if __name__ == "__main__":
    main()
