"""The run's driver: the output folder, the stages in order, resume, the report; and ``main``.

Stages: load p0 → sample G completions per prompt → score under p0 → make p1 (an in-process
update step, or a second checkpoint) → score under p1 → tokens, probe (when configured) →
estimate → report. Every stage's output is written to the output folder as soon as it exists
(samples chunk by chunk); rerunning the same config resumes from them, and a folder holding a
different config's results is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from isdelta import program
from isdelta.program import ConfigError, stage
from isdelta.run.config import RunConfig, config_hash, load_config
from isdelta.run.data import RunError, load_records
from isdelta.run.stages import (
    estimate_inputs,
    make_p1,
    probe_stage,
    sample_stage,
    score_stage,
    token_estimates,
    tokens_stage,
)
from isdelta.training.update import ZeroUpdateError

__all__ = ["PROGRAM", "main", "prepare_output", "run"]


def prepare_output(cfg: RunConfig, out: Path) -> None:
    """Create the folder, or check that what it holds came from this config (resume or refuse)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg)
    stamp = out / "config_hash"
    if stamp.exists() and stamp.read_text().strip() != h:
        raise RunError(
            f"output folder {out} holds results of a different config (hash {stamp.read_text().strip()} "
            f"vs {h} now); isdelta never mixes them. Pass --out NEW_DIR, or delete {out} to start over."
        )
    stamp.write_text(h + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _p1_done(cfg: RunConfig, out: Path, probe, tokens) -> bool:
    """Whether a resumed run needs no model change: p1's scores and the update record exist, and
    neither a probe (it needs the update's direction) nor the token stage (p1) is still due."""
    return (
        (out / "scores1.npz").exists()
        and (out / "update.json").exists()
        and (cfg.probe is None or probe is not None)
        and (cfg.tokens is None or tokens is not None)
    )


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run(cfg: RunConfig, out: Path | None = None) -> dict:
    """Run every stage (resuming from `out`); return the report dict."""
    import torch

    from isdelta.engine import SplitLM
    from isdelta.estimators import estimate, estimate_per_prompt, headline
    from isdelta.run.report import headline_lines, write_report

    out = Path(out or cfg.output.dir)
    prepare_output(cfg, out)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    records = load_records(cfg)
    with stage("load p0", timings):
        model0, tok = cfg.model.load()
    device = str(next(model0.parameters()).device)
    # tokens a next-token distribution can spread over: per-token entropies above log of it are impossible
    support = min(SplitLM.of(model0).vocab_size, cfg.sampling.top_k or 1 << 62)
    with stage("sample", timings):
        rollouts, texts, stopped, transform = sample_stage(cfg, model0, tok, records, out)
    with stage("score p0", timings):
        s0 = score_stage(cfg, model0, rollouts, transform, out / "scores0.npz")
    probe, tokens = _read_json(out / "probe.json"), _read_json(out / "tokens.json")
    if _p1_done(cfg, out, probe, tokens):
        update_info = _read_json(out / "update.json")
        s1 = score_stage(cfg, None, rollouts, transform, out / "scores1.npz")
    else:
        keep_p0 = cfg.probe is not None or cfg.tokens is not None  # stages that need both models
        with stage("make p1", timings):
            model1, update_info = make_p1(cfg, model0, tok, rollouts, texts, records, transform, keep_p0)
        if not keep_p0:
            model0 = None  # an in-process update turned these weights into p1
        (out / "update.json").write_text(json.dumps(update_info, indent=2, default=str))
        with stage("score p1", timings):
            s1 = score_stage(cfg, model1, rollouts, transform, out / "scores1.npz")
        if cfg.tokens is not None and tokens is None:
            with stage("tokens", timings):
                tokens = tokens_stage(cfg, model0, model1, tok, records, rollouts, transform, out)
        if cfg.probe is not None:
            with stage("probe", timings):
                probe = probe_stage(cfg, model0, model1, rollouts, s0, transform, out)
    args, kw = estimate_inputs(cfg, s0, s1, stopped)
    with stage("estimate", timings):
        res = estimate(*args, **kw)
        per_prompt = estimate_per_prompt(*args, **kw)
    with stage("estimate per decision", timings):
        per_decision = token_estimates(cfg, s0, s1)
        decision = headline(res, *per_decision, support_size=support)
    tok_est = per_decision[0] if per_decision else None
    with stage("report", timings):
        meta = {
            "name": out.name,
            "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg),
            "device": device,
            "timings": timings,
            "update": update_info,
            "transform": transform.to_dict(),
            "p0": cfg.model.path,
            "probe": probe,
            "tokens": tokens,
            "p1": (
                f"`{cfg.updated.path}`"
                if cfg.updated
                else f"p0 after {cfg.update.steps} {cfg.update.optimizer} step(s) of {cfg.update.loss} "
                f"(lr {cfg.update.lr:g})"
            ),
        }
        report = write_report(
            out,
            res,
            s0,
            s1,
            texts,
            meta,
            per_prompt,
            decision,
            tok=tok_est,
            plots=cfg.output.plots,
            n_trace=cfg.output.n_trace_samples,
        )
    print(res.summary())
    print("\n" + "\n".join(headline_lines(res, decision)))
    if tokens is not None:
        for carrier, lines in tokens.get("category_tables", {}).items():
            print(f"\ntoken classes on {carrier} (p0's class; deltas p1 − p0):\n" + "\n".join(lines))
    print(f"\nreport: {out / 'summary.md'}  (report.json, sequences.csv, plots)")
    return report


PROGRAM = program.Program(
    prog="python -m isdelta.run",
    description="ΔH of one update, end to end.",
    set_example="update.lr=1e-4",
    load=load_config,
    execute=run,
    errors={
        ConfigError: (2, ""),
        RunError: (2, ""),
        # never reported as a measured ΔH = 0: the update did not move the model at all
        ZeroUpdateError: (3, "the update did not change the model, so there is no ΔH to measure: "),
    },
)


def main(argv: list[str] | None = None) -> int:
    """``python -m isdelta.run cfg.yaml [--set k=v ...] [--out DIR]``; returns the exit code."""
    return program.main(PROGRAM, argv)
