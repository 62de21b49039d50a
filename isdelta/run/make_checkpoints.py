"""Real fine-tuned checkpoints for a trajectory demo: ``python -m isdelta.run.make_checkpoints CFG``.

Reads a trajectory config (``checkpoints: [path, ...]``): from its ``model``, on its data, it
takes in-process update steps (the run's own ``update`` code: SFT on the data's reference
responses, or REINFORCE on fresh samples of the current model with the rule reward) and saves
the model after each group of steps at the next path of ``checkpoints`` (an HF folder with the
tokenizer, float32 safetensors). The learning rate of checkpoint k is ``lr · growth^(k−1)``:
a growing step, so the later checkpoints move far from the base (past the IS horizon) while
each consecutive step stays small enough to read from its own samples. A checkpoint already
made by the same recipe (``isdelta_checkpoint.json`` in its folder) is kept, and training
resumes from the last one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isdelta.program import ConfigError, stamp_of
from isdelta.run.config import RunConfig, load_config
from isdelta.run.data import check_records, load_records, records_digest

__all__ = ["main", "make_checkpoints"]

RECIPE = "isdelta_checkpoint.json"


def _step_config(cfg: RunConfig, args, lr: float) -> RunConfig:
    """The trajectory config as a one-pair run config whose ``update`` is this step."""
    raw = cfg.model_dump(mode="json", exclude={"checkpoints"})
    raw["update"] = {"loss": args.loss, "optimizer": args.optimizer, "lr": lr, "steps": args.steps}
    if args.loss == "reinforce":
        raw["update"]["reward"] = args.reward
    return load_config(raw)


def make_checkpoints(cfg: RunConfig, args) -> list[dict]:
    """Train and save every checkpoint of ``cfg.checkpoints``; returns their recipes."""
    from isdelta.engine.sampling import sample
    from isdelta.run.stages import make_p1

    records = load_records(cfg)
    recipes, model, last = [], None, None  # `last`: the newest checkpoint kept from an earlier run
    train = {k: v for k, v in vars(args).items() if k != "config"}
    for k, path in enumerate(cfg.checkpoints, 1):
        lr = args.lr * args.growth ** (k - 1)
        step_cfg = _step_config(cfg, args, lr)
        check_records(step_cfg, records)  # sft needs responses, reinforce answers
        # the flags (lr: checkpoint 1's) first, then this checkpoint's own lr over them
        recipe = {"base": cfg.model.path, "data": records_digest(records), **train, "lr1": args.lr, "k": k, "lr": lr}
        recipe["chain"] = stamp_of([r["chain"] for r in recipes] + [recipe])  # this step and all before
        saved = Path(path) / RECIPE
        if model is None and saved.exists() and json.loads(saved.read_text()).get("chain") == recipe["chain"]:
            print(f"[isdelta] checkpoint {k} ({path}) already made by this recipe: kept", flush=True)
            recipes.append(recipe)
            last = path
            continue
        if model is None:
            model, tok = (cfg.model if last is None else cfg.model.model_copy(update={"path": last})).load("model")
        rollouts = texts = None
        from isdelta.engine import LogitTransform

        transform = LogitTransform(cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p)
        if args.loss == "reinforce":  # fresh samples of the current model, as a trainer draws them
            s = cfg.sampling
            part = sample(
                model,
                tok,
                [r["prompt"] for r in records],
                num_samples=s.num_samples,
                transform=transform,
                max_new_tokens=s.max_new_tokens,
                stop_strings=s.stop_strings,
                seed=cfg.seed * 7919 + k,
            )
            rollouts, texts = part.rollouts, part.texts
        model, info = make_p1(step_cfg, model, tok, rollouts, texts, records, transform, keep_p0=False)
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        recipe.update(info={k2: v for k2, v in info.items() if not isinstance(v, (list, dict))})
        saved.write_text(json.dumps(recipe, indent=2, default=str))
        print(f"[isdelta] checkpoint {k}: lr {lr:g}, ‖Δθ‖ {info.get('param_change_norm', float('nan')):.4g} → {path}")
        recipes.append(recipe)
    return recipes


def _load(path: str, overrides) -> RunConfig:
    cfg = load_config(path, overrides)
    if cfg.checkpoints is None:
        raise ConfigError(f"{path}: no `checkpoints:` list", fix="list where the checkpoints go (checkpoints: [...])")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The training flags here; config, ``--set`` and the error boundary (one line, exit codes,
    Ctrl-C: the checkpoints saved so far are kept and the same command resumes) are the run's."""
    from isdelta.program import Program
    from isdelta.program import main as program_main
    from isdelta.run.pipeline import PROGRAM

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--loss", choices=("sft", "reinforce"), default="sft")
    p.add_argument("--reward", choices=("answer_match", "boxed_match"), default="answer_match")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of checkpoint 1")
    p.add_argument("--growth", type=float, default=1.0, help="lr factor from one checkpoint to the next")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per checkpoint")
    args, rest = p.parse_known_args(argv)
    prog = Program(
        prog="python -m isdelta.run.make_checkpoints",
        description=(
            "Real fine-tuned checkpoints for a trajectory demo, saved at the config's `checkpoints:` paths. "
            "Training flags: "
            + "; ".join(
                f"{a.option_strings[0]} {'|'.join(a.choices or ['X'])} (default {a.default})" for a in p._actions
            )
        ),
        set_example="data.limit=6",
        load=_load,
        execute=lambda cfg, out: make_checkpoints(cfg, args),
        errors=PROGRAM.errors,
    )
    return program_main(prog, rest)


if __name__ == "__main__":
    raise SystemExit(main())
