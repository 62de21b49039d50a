"""ΔH along a series of checkpoints, from one sample set of the base, chained past the IS horizon.

A run config with ``checkpoints: [path, ...]`` (in training order) asks how the entropy moved
from the base ``model`` (checkpoint 0) through each checkpoint k = 1 … K::

    direct   base samples ──scored under──▶ p0, p1, …, p_{h−1}       ΔH(0→k), one sample set
    ─────────────────────── IS horizon h: the first k whose direct estimate the headline policy
                            (DESIGN.md §5.4) declares not valid per sequence
    chained  p_{h−1}'s own samples ──▶ p_{h−1}, p_h                   ΔH(h−1→h)
             p_h's own samples     ──▶ p_h, p_{h+1}                   ΔH(h→h+1)  …

    H(k) = H(h−1) + Σ_{j=h−1}^{k−1} ΔH(j→j+1),   SE = √(SE(H(h−1))² + Σ_j SE(ΔH(j→j+1))²)

Each segment is estimated as the run estimates one pair (``estimate``, ``estimate_tokens`` and
the headline policy, on the same code path), so every number carries a CI, ESS, k̂ and the chosen
method. The sample sets are independent (each checkpoint samples with its own seed), so the
variances of the chain add.

Every row has two verdicts, one per level of the policy: ``valid`` (per sequence) and
``valid_tok`` (per token), chained separately (:mod:`isdelta.run.trajectory_chain`). The horizon
is where the per-sequence level fails; where the base's samples still hold per token there, that
row keeps its direct per-token value and the per-token chain starts from it. A segment not valid
at a level stops that level's chain: that row and every later one are marked not valid at that
level with the reason, never a number that only looks like one; the other level goes on.

The own-sample check: where checkpoint k sampled itself (the source of a chained step), its row's
H at each level (weighted or chained) is compared with the plain mean over its own samples;
z = |Δ| / √(SE² + SE_own²) above :func:`own_sample_z` (Bonferroni over the two levels: ≤ 1 − level
false alarms per row) makes that level of the row, and of every chained row built on it, not valid.

Saved parts (resumed, verified, like the run's): ``samples/`` and ``scores0.npz`` (the base),
and per checkpoint ``checkpoints/KK-NAME/``: ``direct.npz`` (it, scored on the base samples),
``samples/`` (its own samples, for a chained step), ``self.npz`` and ``next.npz`` (its samples
scored under it and under the next checkpoint). Outputs: ``trajectory.csv``, ``trajectory.md``,
``trajectory.json`` and ``trajectory.png``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from isdelta.program import ConfigError, ModelConfig, stage, stamp_of
from isdelta.program.identity import model_identity
from isdelta.run.config import RunConfig
from isdelta.run.data import RunError, check_context, check_prompts, prompt_lengths
from isdelta.run.stages import estimate_inputs, sample_stage, score_stage, token_estimates
from isdelta.run.trajectory_chain import Point, Segment, chain, horizon, own_sample_z

__all__ = [
    "Checkpoint",
    "Point",
    "Segment",
    "chain",
    "check_checkpoints",
    "checkpoint_list",
    "horizon",
    "own_sample_z",
    "run_trajectory",
]

# the seed of checkpoint k's own samples is seed + SEED_STRIDE·k: the sample sets of the chain
# must be independent (the variances of its steps add), and the same seed would draw common
# random numbers from neighbouring checkpoints
SEED_STRIDE = 1_000_003
# how the checkpoints of a config are made when no training run saved them (the demo's recipe)
MAKE_CHECKPOINTS = "python -m isdelta.run.make_checkpoints CONFIG.yaml --lr 1e-3 --growth 1.6"
SAVE_MORE_OFTEN = "List checkpoints closer together (save more often)."


@dataclass(frozen=True)
class Checkpoint:
    """Model k of the trajectory (k = 0 is the base): how it loads, where its parts live."""

    k: int
    name: str
    model: ModelConfig
    key: str  # the config key, for messages: "model" or "checkpoints.3"
    subdir: str  # its parts under the output folder ("" for the base)

    def identity(self) -> str:
        """The content identity of its files (:func:`isdelta.program.identity.model_identity`): a
        checkpoint rewritten in place (a training run restarted into the same folder, a restore
        with the old size and mtime) never reuses parts scored on the old one."""
        return model_identity(self.model, self.key)


def checkpoint_list(cfg: RunConfig) -> list[Checkpoint]:
    """The base and every entry of ``checkpoints``, loaded like ``model`` (dtype, device, …)."""
    out = [Checkpoint(0, "base", cfg.model, "model", "")]
    for i, path in enumerate(cfg.checkpoints, 1):
        name = Path(path.rstrip("/")).name or path
        sub = f"checkpoints/{i:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
        out.append(Checkpoint(i, name, cfg.model.model_copy(update={"path": path}), f"checkpoints.{i - 1}", sub))
    return out


def check_checkpoints(cfg: RunConfig, tok0, records: list[dict]) -> None:
    """Every checkpoint exists, its tokenizer maps text to p0's ids, and every prompt fits its
    context with ``sampling.max_new_tokens`` (each checked as ``model`` is), before any work:
    a RunError or ConfigError naming the entry."""
    from isdelta.engine import check_compatible, context_size
    from isdelta.engine.models import load_model_config

    lengths = prompt_lengths(cfg, tok0, records)
    for ck in checkpoint_list(cfg)[1:]:
        try:
            tok = ck.model.load_tokenizer(ck.key)  # a ConfigError naming checkpoints.i.path
        except ConfigError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # not made yet: say how to make them
                raise ConfigError(
                    f"{ck.key}.path: no checkpoint at {ck.model.path}",
                    "a trajectory scores checkpoints that a training run saved, and none is there",
                    f"list the folders your training saved, or make them from this config first: {MAKE_CHECKPOINTS} "
                    "(configs/trajectory_demo.yaml: `make trajectory-demo` makes them and runs it)",
                ) from None
            raise
        try:
            check_compatible(tok0, tok)
        except ValueError as e:
            why = str(e).removeprefix("the two models' ")
            raise RunError(
                f"{ck.key}: its tokenizer is not model.path's", why, "list checkpoints of one model"
            ) from None
        m = ck.model
        try:
            config = load_model_config(m.path, trust_remote_code=m.trust_remote_code, allow_download=m.allow_download)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{ck.key}.path: cannot read its config", str(e), "check the checkpoint") from None
        check_context(cfg, lengths, context_size(config), f"{ck.key}'s")


# --------------------------------------------------------------------------- the stages
class _Models:
    """Checkpoints loaded on demand, at most two held (a chained step needs its sampler and the
    next checkpoint)."""

    def __init__(self) -> None:
        self.held: dict[int, tuple] = {}

    def get(self, ck: Checkpoint, timings: dict):
        if ck.k not in self.held:
            while len(self.held) >= 2:
                self.held.pop(min(self.held))
            with stage(f"load {ck.key} ({ck.name})", timings):
                model, _ = ck.model.load(ck.key)
            self.held[ck.k] = model
        return self.held[ck.k]


def _score(cfg, models, ck: Checkpoint, timings, rollouts, transform, folder, name: str, samples_id: str, like=None):
    """``ck``'s scores on one sample set, saved as ``name`` (loads ``ck`` only when not saved);
    ``like``: the source's scores of the same samples, whose path (fused or eager) these take."""
    inputs = stamp_of([samples_id, ck.identity()])
    folder.subfolder(str(Path(name).parent))
    saved = score_stage(cfg, None, rollouts, transform, folder, name, inputs)
    if saved is not None:
        return saved
    try:
        with stage(f"score {ck.key} ({ck.name})", timings):
            return score_stage(cfg, models.get(ck, timings), rollouts, transform, folder, name, inputs, like)
    except FloatingPointError as e:
        first = str(e).split(":")[0]
        raise RunError(
            f"scoring {ck.key} ({ck.model.path}) gave NaN/inf logits ({first})",
            "its weights are broken, or the logits overflow" + (" in float16" if ck.model.dtype == "float16" else ""),
            "set model.dtype: float32 or bfloat16" if ck.model.dtype == "float16" else f"check {ck.key}",
        ) from None


def _segment(cfg: RunConfig, source: Checkpoint, target: Checkpoint, sa: dict, sb: dict, stopped, support: int):
    """ΔH(source → target) on source's samples, as the run estimates one pair: ``estimate``,
    the per-decision estimates and the headline policy."""
    from isdelta.estimators import Headline, estimate, headline

    args, kw = estimate_inputs(cfg, sa, sb, stopped)
    try:
        res = estimate(*args, **kw)
    except ValueError as e:  # scores the estimators refuse: this segment is not valid, the horizon
        own_args, own_kw = estimate_inputs(cfg, sa, sa, stopped)  # the source on itself: its own entropy
        own = estimate(*own_args, **own_kw)
        reason = f"the estimators refused the scores of {target.key} on {source.key}'s samples: {e}"
        refused = Headline(False, "none", "no method: the scores were refused", reason, SAVE_MORE_OFTEN)
        return Segment(source.k, target.k, None, refused, (own.h0_rb or own.h0, own.h0_tok_rb or own.h0_tok))
    decision = headline(res, *token_estimates(cfg, sa, sb, support=support), support_size=support)
    return Segment(source.k, target.k, res, decision)


def _own_samples(cfg, models, ck: Checkpoint, tok, records, folder, timings):
    """Checkpoint ``ck``'s own samples (seed + SEED_STRIDE·k), saved under its folder."""
    folder.subfolder(ck.subdir)
    cfg_k = cfg.model_copy(update={"seed": cfg.seed + SEED_STRIDE * ck.k})
    inputs = stamp_of([ck.identity(), cfg_k.seed])
    with stage(f"sample {ck.key} ({ck.name})", timings):
        rollouts, _, stopped, transform, names = sample_stage(
            cfg_k, models.get(ck, timings), tok, records, folder, f"{ck.subdir}/samples", inputs
        )
    return rollouts, stopped, transform, folder.digest(*names)


def run_trajectory(cfg: RunConfig, folder, records: list[dict]) -> dict:
    """Every stage of a trajectory run (resuming from the verified parts); returns the report."""
    import torch

    from isdelta.engine import SplitLM

    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    cks = checkpoint_list(cfg)
    models = _Models()
    with stage("load p0", timings):
        model0, tok = cfg.model.load("model")
    models.held[0] = model0
    check_prompts(cfg, model0, tok, records)
    support = min(SplitLM.of(model0).vocab_size, cfg.sampling.top_k or 1 << 62)
    device = str(next(model0.parameters()).device)
    with stage("sample", timings):
        rollouts, _, stopped, transform, names = sample_stage(
            cfg, model0, tok, records, folder, inputs=cks[0].identity()
        )
    base_id = folder.digest(*names)
    model0 = None  # held by `models` until two checkpoints are
    s0 = _score(cfg, models, cks[0], timings, rollouts, transform, folder, "scores0.npz", base_id)
    direct = []
    for ck in cks[1:]:
        s1 = _score(cfg, models, ck, timings, rollouts, transform, folder, f"{ck.subdir}/direct.npz", base_id, s0)
        direct.append(_segment(cfg, cks[0], ck, s0, s1, stopped, support))
        if not direct[-1].decision.valid:
            break
    steps = []
    h = horizon(direct)
    for j in range(h - 1, len(cks) - 1) if h is not None else ():
        if j == 0:  # the base's own samples: the direct segment itself
            steps.append(direct[0])
            continue
        ro, stp, tf, sid = _own_samples(cfg, models, cks[j], tok, records, folder, timings)
        sa = _score(cfg, models, cks[j], timings, ro, tf, folder, f"{cks[j].subdir}/self.npz", sid)
        sb = _score(cfg, models, cks[j + 1], timings, ro, tf, folder, f"{cks[j].subdir}/next.npz", sid, sa)
        steps.append(_segment(cfg, cks[j], cks[j + 1], sa, sb, stp, support))
    points = chain(direct, steps, cfg.estimator.level, math.log(support))
    from isdelta.run.trajectory_report import write_trajectory

    meta = {"device": device, "timings": timings, "transform": transform.to_dict(), "support": support}
    return write_trajectory(folder.path, cfg, cks, points, direct, h, meta)
