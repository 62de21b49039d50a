"""``python -m isdelta.run cfg.yaml [--set k=v ...] [--out DIR]``: ΔH of one update, end to end.

Stages: load p0 → sample G completions per prompt → score under p0 → make p1 (an in-process
update step, or a second checkpoint) → score under p1 → estimate → report. Every stage's output
is written to the output folder as soon as it exists (samples chunk by chunk); rerunning the same
config resumes from them, and a folder holding a different config's results is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from isdelta.config import ConfigError, RunConfig, config_hash, load_config
from isdelta.report import headline_lines

__all__ = ["main", "run", "RunError"]


class RunError(RuntimeError):
    """A run that cannot proceed (output folder conflict, unusable data); the message says why."""


# ---------------------------------------------------------------------------- output folder
def prepare_output(cfg: RunConfig, out: Path) -> None:
    """Create the folder, or check that what it holds came from this config (resume or refuse)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg)
    stamp = out / "config_hash"
    if stamp.exists() and stamp.read_text().strip() != h:
        raise RunError(
            f"output folder {out} holds results of a different config (hash {stamp.read_text().strip()} "
            f"vs {h} now); isdelta never mixes them. Pass --out NEW_DIR, or delete {out} to start over.")
    stamp.write_text(h + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@contextmanager
def stage(name: str, timings: dict):
    print(f"[isdelta] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    print(f"[isdelta] {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data
def load_records(cfg: RunConfig) -> list[dict]:
    """The prompts (str or chat messages), answers and reference responses of the data file."""
    d = cfg.data
    if d.path.startswith("builtin:"):
        from importlib.resources import files

        path = Path(str(files("isdelta") / "data" / f"{d.path.split(':', 1)[1]}.jsonl"))
    else:
        path = Path(d.path).expanduser()
    if not path.is_file():
        raise RunError(f"data.path: {path} does not exist (use a jsonl file, or builtin:math).")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{n}: not valid JSON ({e.msg}).") from e
        if d.messages_field in row:
            prompt = row[d.messages_field]
        elif d.prompt_field in row:
            prompt = row[d.prompt_field]
            if d.chat_template:
                prompt = [{"role": "user", "content": prompt}]
        else:
            raise RunError(f"{path}:{n}: no '{d.prompt_field}' or '{d.messages_field}' field "
                           f"(set data.prompt_field / data.messages_field); keys: {sorted(row)}.")
        records.append({"prompt": prompt, "answer": row.get(d.answer_field),
                        "response": row.get(d.response_field)})
        if d.limit and len(records) >= d.limit:
            break
    if not records:
        raise RunError(f"data.path: {path} holds no prompts.")
    return records


# ---------------------------------------------------------------------------- stages
def sample_stage(cfg: RunConfig, model, tok, records: list[dict], out: Path, subdir: str = "samples"):
    """Sample in chunks of prompts; each chunk is saved when done and reloaded on resume."""
    from isdelta.engine import LogitTransform, Rollouts
    from isdelta.engine.sampling import Samples, sample

    s = cfg.sampling
    transform = LogitTransform(s.temperature, s.top_k, s.top_p)
    parts_dir = out / subdir
    parts_dir.mkdir(exist_ok=True)
    k = s.prompts_per_batch
    parts = []
    for c, start in enumerate(range(0, len(records), k)):
        path = parts_dir / f"part-{c:04d}.pt"
        if path.exists():
            parts.append(Samples.load(path))
            continue
        part = sample(model, tok, [r["prompt"] for r in records[start:start + k]], num_samples=s.num_samples,
                      transform=transform, max_new_tokens=s.max_new_tokens, stop_strings=s.stop_strings,
                      seed=cfg.seed * 100_003 + c)
        part.save(path)
        parts.append(part)
    rollouts = Rollouts.concat([p.rollouts for p in parts], pad_token_id=tok.pad_token_id)
    texts = [t for p in parts for t in p.texts]
    stopped = np.concatenate([np.asarray(p.stopped) for p in parts])
    return rollouts, texts, stopped, transform


def score_stage(cfg: RunConfig, model, rollouts, transform, path: Path) -> dict:
    """Scores as numpy arrays; saved to `path` (npz) and reloaded on resume."""
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    from isdelta.engine import EngineConfig, LogProbEngine

    # Always score whole sequences: the importance weights need the full ratio (p0 sampled the
    # stop token too); engine.include_eos=false is applied in the estimator (include="no_eos").
    ecfg = EngineConfig.from_transform(transform, include_eos=True, token_budget=cfg.engine.token_budget)
    arrays = LogProbEngine(ecfg).score(model, rollouts).to_numpy()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def make_p1(cfg: RunConfig, model, tok, rollouts, texts, records, transform):
    """p1: the update step applied in place to `model`, or a second checkpoint."""
    from isdelta.engine import EngineConfig, check_compatible, load_model

    if cfg.updated is not None:
        u = cfg.updated
        model1, tok1 = load_model(u.path, dtype=u.dtype, device=u.device,
                                  trust_remote_code=u.trust_remote_code, allow_download=u.allow_download)
        check_compatible(tok, tok1)
        return model1, {"kind": "checkpoint", "path": u.path}
    from isdelta.training import REWARDS, update

    u = cfg.update
    # the update trains on every counted token, EOS included (as trainers do); engine.include_eos
    # only changes what is measured, never p1
    ecfg = EngineConfig.from_transform(transform, token_budget=cfg.engine.token_budget)
    G = cfg.sampling.num_samples
    import torch

    torch.manual_seed(cfg.seed)
    if u.loss == "reinforce":
        answers = [records[g]["answer"] for g in rollouts.group.tolist()]
        if any(a is None for a in answers):
            raise RunError(f"update.loss=reinforce needs data.answer_field ('{cfg.data.answer_field}') on every row.")
        rewards = np.array([REWARDS[u.reward](t, str(a)) for t, a in zip(texts, answers)])
        result = update(model, loss="reinforce", rollouts=rollouts, rewards=rewards, optimizer=u.optimizer,
                        lr=u.lr, steps=u.steps, engine_config=ecfg)
    else:
        result = update(model, loss="sft", rollouts=sft_rollouts(tok, records, cfg), optimizer=u.optimizer,
                        lr=u.lr, steps=u.steps, engine_config=EngineConfig(token_budget=cfg.engine.token_budget))
    info = {"kind": "update", **result.to_dict()}
    if u.loss == "reinforce":
        info.update(reward=u.reward, mean_reward=float(rewards.mean()), samples_per_prompt=G)
    return model, info


def sft_rollouts(tok, records: list[dict], cfg: RunConfig):
    """Prompt + reference response (+ EOS) per record, for the sft update."""
    from isdelta.engine import Rollouts

    missing = [i for i, r in enumerate(records) if not r["response"]]
    if missing:
        raise RunError(f"update.loss=sft needs a reference response ('{cfg.data.response_field}') "
                       f"for every prompt; records {missing[:5]} have none.")
    prompts, comps = [], []
    for r in records:
        p = r["prompt"]
        ids = (tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
               if isinstance(p, list) else tok(p)["input_ids"])
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        prompts.append(list(ids))
        comps.append(tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)


# ---------------------------------------------------------------------------- driver
def run(cfg: RunConfig, out: Path | None = None) -> dict:
    """Run every stage (resuming from `out`); return the report dict."""
    import torch

    from isdelta.engine import load_model
    from isdelta.estimators import estimate
    from isdelta.report import write_report

    out = Path(out or cfg.output.dir)
    prepare_output(cfg, out)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    records = load_records(cfg)
    m = cfg.model
    with stage("load p0", timings):
        model, tok = load_model(m.path, dtype=m.dtype, device=m.device,
                                trust_remote_code=m.trust_remote_code, allow_download=m.allow_download)
    with stage("sample", timings):
        rollouts, texts, stopped, transform = sample_stage(cfg, model, tok, records, out)
    with stage("score p0", timings):
        s0 = score_stage(cfg, model, rollouts, transform, out / "scores0.npz")
    update_path, probe_path, tokens_path = out / "update.json", out / "probe.json", out / "tokens.json"
    probe = json.loads(probe_path.read_text()) if probe_path.exists() else None
    tokens = json.loads(tokens_path.read_text()) if tokens_path.exists() else None
    # resuming past p1 needs no model change, unless a probe still needs the update's direction
    # or the token diagnostics still need p1
    if (out / "scores1.npz").exists() and update_path.exists() and (cfg.probe is None or probe) \
            and (cfg.tokens is None or tokens):
        update_info = json.loads(update_path.read_text())
        s1 = score_stage(cfg, None, rollouts, transform, out / "scores1.npz")
    else:
        from isdelta.probes import snapshot_parameters

        theta0 = snapshot_parameters(model) if (cfg.probe or cfg.tokens) and cfg.update else None
        with stage("make p1", timings):
            model1, update_info = make_p1(cfg, model, tok, rollouts, texts, records, transform)
        update_path.write_text(json.dumps(update_info, indent=2, default=str))
        with stage("score p1", timings):
            s1 = score_stage(cfg, model1, rollouts, transform, out / "scores1.npz")
        if cfg.tokens is not None and tokens is None:  # before the probe, which puts `model` back at θ0
            with stage("tokens", timings):
                tokens = tokens_stage(cfg, model, model1, theta0, tok, records, rollouts, transform, out)
        if cfg.probe is not None:
            with stage("probe", timings):
                probe = probe_stage(cfg, model, model1, theta0, rollouts, s0, transform, out)
    e = cfg.estimator
    est_kw = dict(weights=e.weights, prompts=e.prompts, level=e.level, clip=e.clip)
    with stage("estimate", timings):
        res = estimate(s0["logp"], s1["logp"], s0["length"], s0["group"], entropy_sum0=s0["entropy_sum"],
                       entropy_sum1=s1["entropy_sum"], **est_kw, **{"stopped": stopped, **eos_terms(cfg, s0, s1)})
    with stage("estimate per decision", timings):
        tok = token_estimate(cfg, s0, s1)
    with stage("report", timings):
        meta = {"name": out.name, "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg),
                "device": str(next(model.parameters()).device), "timings": timings, "update": update_info,
                "transform": transform.to_dict(), "estimator_kw": est_kw, "p0": m.path,
                "p1": (f"`{cfg.updated.path}`" if cfg.updated else
                       f"p0 after {cfg.update.steps} {cfg.update.optimizer} step(s) of {cfg.update.loss} "
                       f"(lr {cfg.update.lr:g})")}
        meta["probe"], meta["tokens"] = probe, tokens
        report = write_report(out, res, s0, s1, texts, meta, tok=tok, smoothed=smoothed_weights(s0, s1, est_kw),
                              plots=cfg.output.plots, n_trace=cfg.output.n_trace_samples)
    print(res.summary())
    print("\n" + "\n".join(headline_lines(res, tok)))
    if tokens is not None:
        for carrier, lines in tokens.get("category_tables", {}).items():
            print(f"\ntoken classes on {carrier} (p0's class; deltas p1 − p0):\n" + "\n".join(lines))
    print(f"\nreport: {out / 'summary.md'}  (report.json, sequences.csv, plots)")
    return report


def probe_stage(cfg: RunConfig, model, model1, theta0, rollouts, s0: dict, transform, out: Path) -> dict:
    """ΔH₁ (gradient and function space) against the true ΔH along θ1 − θ0, at every α."""
    from isdelta.engine import EngineConfig
    from isdelta.probes import parameter_delta, restore_parameters, run_probe

    if theta0 is not None:  # in-process update: `model` holds θ1; the probe needs it back at θ0
        direction = parameter_delta(theta0, model)
        restore_parameters(model, theta0)
    else:
        direction = parameter_delta(model, model1)
    e, p = cfg.estimator, cfg.probe
    ecfg = EngineConfig.from_transform(transform, include_eos=cfg.engine.include_eos,
                                       token_budget=cfg.engine.token_budget, progress=False)
    return run_probe(model, direction, rollouts, s0, alphas=list(p.sweep), gradient=p.gradient,
                     per_token=p.per_token, engine_config=ecfg,
                     estimator_kw=dict(weights=e.weights, prompts=e.prompts, level=e.level, clip=e.clip),
                     out_dir=out, plots=cfg.output.plots)


def tokens_stage(cfg: RunConfig, model, model1, theta0, tok, records, rollouts, transform, out: Path) -> dict:
    """Token-level diagnostics of p0 vs p1 on the configured carriers (tokens.csv/json/md, plots).

    Carriers: p0's samples and p1's own (sampled with the same transform and seeds), and/or the
    data's reference responses teacher-forced (built as for the sft update).
    """
    import copy

    from isdelta.probes import TokenOptions, restore_parameters, run_tokens

    t = cfg.tokens
    model0 = model
    if theta0 is not None:  # in-process update: `model` holds θ1; p0 is a copy put back at θ0
        model0 = copy.deepcopy(model)
        restore_parameters(model0, theta0)
    carriers = {}
    if t.mode in ("generations", "both"):
        carriers["p0 samples"] = rollouts
        carriers["p1 samples"] = sample_stage(cfg, model1, tok, records, out, subdir="samples_p1")[0]
    if t.mode in ("teacher_forced", "both"):
        missing = [i for i, r in enumerate(records) if not r["response"]]
        if missing:
            raise RunError(f"tokens.mode={t.mode} scores reference responses ('{cfg.data.response_field}'); "
                           f"records {missing[:5]} have none. Use tokens.mode=generations.")
        carriers["reference"] = sft_rollouts(tok, records, cfg)
    opts = TokenOptions(
        positions=t.positions, top_k=t.top_k, top_p=t.top_p, tail_k=t.tail_k, transform=transform,
        patterns=t.patterns, window=t.window, n_random=t.n_random, self_correction=t.self_correction,
        self_correction_tokens=t.self_correction_tokens, context_tokens=t.context_tokens,
        thresholds=t.thresholds, include_eos=cfg.engine.include_eos, seed=cfg.seed,
        token_budget=cfg.engine.token_budget)
    return run_tokens(model0, model1, carriers, tokenizer=tok, options=opts, names=("p0", "p1"),
                      n_interesting=t.n_interesting, out_dir=out, plots=cfg.output.plots)


def eos_terms(cfg: RunConfig, s0: dict, s1: dict) -> dict:
    """Estimator arguments that drop the stop token from S, L and the entropy sums."""
    if cfg.engine.include_eos:
        return {"include": "all"}
    # `stopped` here marks rows that end with a counted stop TOKEN (a stop-string row has none)
    return {"include": "no_eos", "stopped": s0["stopped"], "eos_logp0": s0["stop_logp"], "eos_logp1": s1["stop_logp"],
            "eos_entropy_sum0": s0["stop_entropy_sum"], "eos_entropy_sum1": s1["stop_entropy_sum"]}


def token_estimate(cfg: RunConfig, s0: dict, s1: dict):
    """The per-decision, control-variate ΔH (lower variance than sequence-level SNIS).

    Its masks count the stop token (the prefix ratio must include it), so it is reported only
    when the run measures all positions (engine.include_eos = true).
    """
    from isdelta.estimators import estimate_tokens

    if not cfg.engine.include_eos:
        return None
    e = cfg.estimator
    return estimate_tokens(s0["token_logp"], s1["token_logp"], s0["token_entropy"], s1["token_entropy"],
                           s0["mask"], s0["group"], method="cv", prompts=e.prompts, level=e.level)


def smoothed_weights(s0: dict, s1: dict, est_kw: dict) -> np.ndarray | None:
    """The normalised weights the estimator used, per row (for sequences.csv and the plot)."""
    from isdelta.estimators import weights as W

    return W.row_weights(s1["logp"] - s0["logp"], s0["group"], est_kw["weights"], est_kw.get("clip"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m isdelta.run", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="cfg.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set update.lr=1e-4 (repeatable)")
    ap.add_argument("--out", help="output folder (default: output.dir of the config)")
    args = ap.parse_args(argv)
    from isdelta.training import ZeroUpdateError

    try:
        cfg = load_config(args.config, args.set)
        run(cfg, Path(args.out) if args.out else None)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ZeroUpdateError as e:
        # never reported as a measured ΔH = 0: the update did not move the model at all
        print(f"error: the update did not change the model, so there is no ΔH to measure: {e}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
