"""The run's driver: the output folder, the stages in order, resume, the report; and ``main``.

Stages: load p0 → sample G completions per prompt → score under p0 → make p1 (an in-process
update step, or a second checkpoint) → score under p1 → tokens, probe (when configured) →
estimate → report. Every check that needs only the config, the data file and the tokenizers
runs before the first sample is drawn. Every stage's output is written to the output folder as
soon as it exists (samples chunk by chunk) and recorded with its checksum and the identity of its
inputs (:class:`isdelta.program.OutputFolder`); rerunning the same command resumes from the parts
that verify and recomputes the others. A folder holding another config's results, or results
for other data, is refused; a second run into a folder in use is refused.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

from isdelta import program
from isdelta.engine.vllm_errors import SamplerEngineError
from isdelta.outputs import atomic_write
from isdelta.program import OutputFolder, stage, stamp_of
from isdelta.program.folder import MANIFEST
from isdelta.program.identity import model_identity
from isdelta.program.ranks import ranks
from isdelta.run.bounds import Shown
from isdelta.run.config import RunConfig, config_hash, load_config
from isdelta.run.data import RunError, check_prompts, check_records, load_records, records_digest
from isdelta.run.shards import Shard, check_shardable, merge, placed
from isdelta.run.stages import (
    check_tokenizers,
    estimate_inputs,
    make_p1,
    p0_sample_stage,
    probe_stage,
    score_stage,
    token_estimates,
    tokens_stage,
)
from isdelta.run.trajectory import check_checkpoints, run_trajectory
from isdelta.training.update import ZeroUpdateError

__all__ = ["PROGRAM", "main", "progress", "run"]

NAME = "isdelta.run"
# what a run writes; present without a manifest, it cannot be verified (an older isdelta wrote it)
RESULTS = ("samples", "samples_p1", "scores0.npz", "scores1.npz", "update.json", "probe.json", "tokens.json")
RESULTS += ("checkpoints", "trajectory.csv", "trajectory.json")  # a trajectory (checkpoints: [...])


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def run(cfg: RunConfig, out: Path | None = None) -> dict:
    """Run every stage (resuming from the verified parts in `out`); return the report dict.

    Everything that needs only the config, the data file and the tokenizers is checked before
    the output folder is touched (the data's records, the devices, ``updated``'s tokenizer
    against p0's), and the prompts' lengths against p0's context before the first sample.
    Under ``torchrun`` each rank runs its share (:mod:`isdelta.run.shards`) and rank 0 writes
    the report (the others return ``{}``).
    """
    import yaml

    key = "--out" if out else "output.dir"
    out = Path(out or cfg.output.dir)
    r = ranks()
    records = r.agree(lambda: _check(cfg, out, key, r))
    stamp = {"config": config_hash(cfg), "data": records_digest(records)}
    shard = Shard.of(cfg, len(records), r)
    with ExitStack() as stack:

        def open_folder(path: Path) -> OutputFolder:
            return stack.enter_context(OutputFolder(path, key, NAME, stamp, RESULTS, error=RunError))

        # rank 0 owns `out` (lock, stamp, report): no rank writes anything before it checked it
        main = r.agree(lambda: open_folder(out) if r.root else None)
        if r.root:
            atomic_write(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        folder = main if r.world == 1 else r.agree(lambda: open_folder(out / shard.folder))
        if cfg.checkpoints is not None:  # ΔH along a series of checkpoints (isdelta.run.trajectory)
            return run_trajectory(cfg, folder, records)
        return _run(cfg, folder, records, shard, out, r.agree(lambda: identities(cfg)))


def identities(cfg: RunConfig) -> dict[str, str]:
    """The content identity of each model the run loads (``model``, and ``updated`` when set):
    every saved part is stamped with those that made it, so a model rewritten in place between
    two runs of one command (even with its old size and mtime) never has its old parts reused."""
    ids = {"model": model_identity(cfg.model, "model")}
    if cfg.updated is not None:
        ids["updated"] = model_identity(cfg.updated, "updated")
    return ids


def _check(cfg: RunConfig, out: Path, key: str, r) -> list[dict]:
    """The data's records, after every check that needs no model weights (RunError/ConfigError)."""
    records = load_records(cfg)
    check_records(cfg, records)
    check_shardable(cfg, len(records), r)
    placed(cfg.model, "model").check_device("model")
    if cfg.updated is not None:
        placed(cfg.updated, "updated").check_device("updated")
        check_tokenizers(cfg.model.load_tokenizer("model"), cfg.updated.load_tokenizer("updated"))
    if cfg.checkpoints is not None:
        check_checkpoints(cfg, cfg.model.load_tokenizer("model"), records)
    if (out / "derived_stamp").exists():  # written by the score program only
        raise RunError(f"{key} {out}: the folder holds an isdelta.score run", fix="pass another --out for the run")
    return records


def _saved_p1(cfg: RunConfig, folder, samples_id: str, models: str):
    """``(update info, p1's scores, probe, tokens)`` saved by an earlier run for these samples and
    models (each None when absent or not verified)."""
    update_info = folder.load("update.json", stamp_of([samples_id, models]), _read_json)
    if update_info is None:
        return None, None, None, None
    p1_id = stamp_of([samples_id, folder.digest("update.json"), models])
    s1 = score_stage(cfg, None, None, None, folder, "scores1.npz", p1_id)
    probe = folder.load("probe.json", p1_id, _read_json) if cfg.probe is not None else None
    tokens = folder.load("tokens.json", p1_id, _read_json) if cfg.tokens is not None else None
    return update_info, s1, probe, tokens


def _non_finite(cfg: RunConfig, which: str, e: FloatingPointError) -> RunError:
    """The engine's "non-finite logits" as a message that names the likely cause for this run."""
    section = cfg.model if which == "p0" or cfg.updated is None else cfg.updated
    half = section.dtype == "float16"
    if which == "p1" and cfg.update is not None:
        why = f"the update step (update.lr {cfg.update.lr:g}) moved the weights so far that the logits overflow"
        fix = "lower update.lr" + (", or load in float32/bfloat16" if half else "")
    else:
        key = "model" if which == "p0" else "updated"
        why = "its weights are broken, or the logits overflow" + (" in float16" if half else "")
        fix = f"set {key}.dtype: float32 or bfloat16" if half else f"check the checkpoint at {key}.path"
    first = str(e).split(":")[0]
    return RunError(f"scoring {which} gave NaN/inf logits ({first})", why, fix)


def _run(cfg: RunConfig, folder, records: list[dict], shard: Shard, out: Path, ids: dict[str, str]) -> dict:
    """The stages on this rank's share; rank 0 merges the ranks' rows, estimates and reports.
    ``ids``: the models' content identities (:func:`identities`), stamped on every part."""
    import torch

    from isdelta.engine import SplitLM

    r = shard.ranks
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    model_cfg = placed(cfg.model, "model")

    def p0_stages():
        with stage("load p0", timings):
            model0, tok = model_cfg.load("model")
        check_prompts(cfg, model0, tok, records)  # before the first sample is drawn
        V = SplitLM.of(model0).vocab_size
        if cfg.tokens is not None and cfg.tokens.top_k > V:
            raise RunError(
                f"tokens.top_k {cfg.tokens.top_k} exceeds the model's vocabulary of {V} tokens",
                "it is how many tokens each position lists",
                f"set tokens.top_k ≤ {V}",
            )
        with stage("sample", timings):
            rollouts, texts, stopped, transform, names, token_logq = p0_sample_stage(
                cfg, model0, tok, records, folder, timings, shard.chunks, identity=ids["model"]
            )
        samples_id = folder.digest(*names)
        with stage("score p0", timings):
            try:
                s0 = score_stage(
                    cfg, model0, rollouts, transform, folder, "scores0.npz", stamp_of([samples_id, ids["model"]])
                )
            except FloatingPointError as e:
                raise _non_finite(cfg, "p0", e) from None
        return model0, tok, rollouts, texts, stopped, transform, token_logq, samples_id, s0

    model0, tok, rollouts, texts, stopped, transform, token_logq, samples_id, s0 = r.agree(p0_stages)
    device = str(next(model0.parameters()).device)
    # tokens a next-token distribution can spread over: per-token entropies above log of it are impossible
    support = min(SplitLM.of(model0).vocab_size, cfg.sampling.top_k or 1 << 62)
    models = stamp_of(ids)  # every model p1's parts depend on
    update_info, s1, probe, tokens = _saved_p1(cfg, folder, samples_id, models)
    missing = s1 is None or (cfg.probe is not None and probe is None) or (cfg.tokens is not None and tokens is None)
    if any(r.gather(missing)):  # the update step is taken by every rank together

        def p1_stages():
            local = records[shard.records]  # the update's reinforce groups number this rank's records
            return _p1_stages(
                cfg, folder, model0, tok, rollouts, texts, local, transform, samples_id, models, s0, timings, r
            )

        update_info, s1, probe, tokens = r.agree(p1_stages)
    model0 = None  # an in-process update may have turned its weights into p1
    rows = dict(s0=s0, s1=s1, texts=texts, stopped=stopped, token_logq=token_logq, update=update_info)
    parts = r.gather_to_root(rows)  # [N_rank, ...] per rank: a few floats per token
    if r.world > 1:
        device = f"{device} × {r.world} torchrun processes ({r.backend})"
    context = dict(transform=transform, support=support, device=device, timings=timings, probe=probe, tokens=tokens)
    context["identity"] = ids
    return r.agree(lambda: _report(cfg, out, folder.stamp["data"], merge(parts), **context) if r.root else {})


def _p1_stages(cfg, folder, model0, tok, rollouts, texts, records, transform, samples_id, models, s0, timings, r):
    """make p1 (the update step, on every rank together), score p1, tokens, probe: ``(update
    info, p1's scores, probe, tokens)``; ``models`` stamps them with the models' identities."""
    out = folder.path
    keep_p0 = cfg.probe is not None or cfg.tokens is not None  # stages that need both models
    with stage("make p1", timings):
        model1, update_info = make_p1(cfg, model0, tok, rollouts, texts, records, transform, keep_p0, r.world > 1)
    if not keep_p0:
        model0 = None  # an in-process update turned these weights into p1
    atomic_write(out / "update.json", json.dumps(update_info, indent=2, default=str))
    folder.record("update.json", inputs=stamp_of([samples_id, models]))
    p1_id = stamp_of([samples_id, folder.digest("update.json"), models])
    with stage("score p1", timings):
        try:
            s1 = score_stage(cfg, model1, rollouts, transform, folder, "scores1.npz", p1_id, like=s0)
        except FloatingPointError as e:
            raise _non_finite(cfg, "p1", e) from None
    tokens = folder.load("tokens.json", p1_id, _read_json) if cfg.tokens is not None else None
    if cfg.tokens is not None and tokens is None:
        with stage("tokens", timings):
            tokens = tokens_stage(cfg, model0, model1, tok, records, rollouts, transform, folder, p1_id)
        folder.record("tokens.json", inputs=p1_id)
    probe = None
    if cfg.probe is not None:
        with stage("probe", timings):
            probe = probe_stage(cfg, model0, model1, rollouts, s0, transform, out)
        folder.record("probe.json", inputs=p1_id)
    return update_info, s1, probe, tokens


def _report(
    cfg: RunConfig,
    out: Path,
    data_hash: str,
    rows: dict,
    *,
    transform,
    support,
    device,
    timings,
    probe,
    tokens,
    identity: dict[str, str],
):
    """Estimate on every row (rank 0 under torchrun), write the report, print the summary.

    Every part is saved by now, so nothing here may leave the folder without a report: scores
    the estimators refuse give a report whose headline is refused with the reason (exit 0, like
    any step the policy cannot read), and a failure of the per-decision estimates or the plots
    leaves them out of a report that says so.
    """
    from isdelta.run.report import gap_lines, headline_lines, terminal_summary, write_refused, write_report

    meta = {
        "name": out.name,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "data_hash": data_hash,
        "identity": identity,  # the models' content identities (xxh3-128 of their files)
        "device": device,
        "timings": timings,
        "update": rows["update"],
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
    try:
        res, per_prompt, gap, per_decision, decision, problems = _estimates(cfg, rows, support, timings)
    except ValueError as e:  # the estimators' input checks: what arrived and the fix
        smaller = "Take a smaller step (update.lr)" if cfg.update is not None else "Compare checkpoints closer together"
        why, advice = str(e), f"{smaller}."
        if "-inf" in why and transform.truncates:  # both scored with one transform: p1's kept set moved
            why = (
                "p1's top-k/top-p kept set leaves out tokens p0 sampled, so p1 gives those samples probability 0 "
                "and p0's samples cannot weigh p1"
            )
            advice = f"{smaller}, or sample without truncation (sampling.top_k, sampling.top_p)."
        elif "-inf" in why:  # no top-k/top-p: only an overflow gives p = 0
            why = "p1 gives probability 0 to tokens p0 sampled, and no top-k/top-p is configured: its logits overflow"
        reason = f"the estimators refused these scores: {why}"
        with stage("report", timings):
            report = write_refused(out, meta, reason, advice)
        print(f"ΔH: not valid — {reason}\n{advice}\n\nreport: {out / 'summary.md'}  (report.json)")
        return report
    tok_est = per_decision[0] if per_decision else None
    shown = Shown.of(decision, support, cfg.sampling.max_new_tokens)
    with stage("report", timings):
        report = write_report(
            out,
            res,
            rows["s0"],
            rows["s1"],
            rows["texts"],
            meta,
            per_prompt,
            decision,
            tok=tok_est,
            plots=cfg.output.plots,
            n_trace=cfg.output.n_trace_samples,
            shown=shown,
            gap=gap,
            problems=problems,
        )
    print(terminal_summary(res, shown, tok_est))
    if gap is not None:
        print("\n".join(gap_lines(gap, res, markdown=False)))
    print("\n" + "\n".join(headline_lines(res, decision, shown)))
    if tokens is not None:
        for carrier, lines in tokens.get("category_tables", {}).items():
            print(f"\ntoken classes on {carrier} (p0's class; deltas p1 − p0):\n" + "\n".join(lines))
    print(f"\nreport: {out / 'summary.md'}  (report.json, sequences.csv, plots)")
    return report


def _estimates(cfg: RunConfig, rows: dict, support: int, timings: dict):
    """``(res, per_prompt, gap, per_decision, decision, problems)`` on the merged rows.

    A ValueError of ``estimate`` (scores it refuses) is raised; one of the per-decision estimates
    leaves them out (``problems`` says why) and the headline is chosen among the others.
    """
    from isdelta.estimators import estimate, estimate_per_prompt, headline, sampler_gap

    s0, s1, token_logq = rows["s0"], rows["s1"], rows["token_logq"]
    args, kw = estimate_inputs(cfg, s0, s1, rows["stopped"], token_logq)
    with stage("estimate", timings):
        res = estimate(*args, **kw)
        per_prompt = estimate_per_prompt(*args, **kw)
        # a sampler q ≠ p0 (vLLM): how far its log-probs are from the engine's p0
        gap = None if token_logq is None else sampler_gap(token_logq, s0["token_logp"], s0["mask"], s0["group"])
    problems = []
    with stage("estimate per decision", timings):
        try:
            per_decision = token_estimates(cfg, s0, s1, token_logq, support)
        except ValueError as e:
            per_decision = []
            problems.append(f"the per-decision estimates refused these scores ({e}); the headline is sequence-level")
        decision = headline(res, *per_decision, support_size=support)
    return res, per_prompt, gap, per_decision, decision, problems


def progress(cfg: RunConfig, out: Path) -> list[str]:
    """What the folder holds that a rerun reuses (the verified parts), for the Ctrl-C message;
    under torchrun, what the ranks' folders hold, summed."""
    ranks_dir = out / "ranks"
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and ranks_dir.is_dir():
        shares = [ranks_dir / f"{k}-of-{world}" for k in range(int(world))]
        parts = {
            f"{p}@{d.name}": v
            for d in shares
            if (d / MANIFEST).exists()
            for p, v in json.loads((d / MANIFEST).read_text(encoding="utf-8"))["parts"].items()
        }
        n = sum(1 for p in parts if p.startswith("samples/") and ".pt@" in p)
        done = {
            k: sum(1 for p in parts if p.startswith(k + "@")) for k in ("scores0.npz", "update.json", "scores1.npz")
        }
        lines = [
            f"p0's samples for {n} chunk(s) of {cfg.sampling.prompts_per_batch} prompts (ranks/R-of-{world}/)"
        ] * bool(n)
        return lines + [f"{k} of {v} of {world} ranks" for k, v in done.items() if v]
    parts = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["parts"]
    lines = []
    for sub, what in (("samples/", "p0's samples"), ("samples_p1/", "p1's samples")):
        n = sum(1 for p in parts if p.startswith(sub) and p.endswith(".pt"))
        if n:
            lines.append(f"{what} for {n} chunk(s) of {cfg.sampling.prompts_per_batch} prompts ({sub})")
    own = sorted({p.split("/")[1] for p in parts if p.startswith("checkpoints/") and "/samples/" in p})
    scored = sorted(p for p in parts if p.startswith("checkpoints/") and p.endswith(".npz"))
    if own or scored:
        lines.append(f"trajectory: {len(scored)} checkpoint score set(s), own samples of {own or 'none'}")
    return lines + [n for n in ("scores0.npz", "update.json", "scores1.npz", "tokens.json", "probe.json") if n in parts]


PROGRAM = program.Program(
    prog="python -m isdelta.run",
    description="ΔH of one update, end to end.",
    set_example="update.lr=1e-4",
    load=load_config,
    execute=run,
    errors={
        # never reported as a measured ΔH = 0: the update did not move the model at all
        ZeroUpdateError: (3, "the update did not change the model, so there is no ΔH to measure: "),
        # vLLM's own failure (a model shape its kernels refuse, a dead engine process): named, with the fallback
        SamplerEngineError: (2, ""),
    },
    progress=progress,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m isdelta.run cfg.yaml [--set k=v ...] [--out DIR]``; returns the exit code."""
    return program.main(PROGRAM, argv)
