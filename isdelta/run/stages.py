"""The run's stages, each reading what it needs from the config and the output folder (an
:class:`isdelta.program.OutputFolder`: a saved part is reused only when its checksum and inputs
match, else it is recomputed).

sample (p0's completions, saved chunk by chunk) → score (one model's arrays, saved:
``scoring.py``) → make p1 (an in-process update step, or a second checkpoint) → estimate → probe
→ tokens. The models are two named states: ``model0`` is p0 and ``model1`` is p1 from the moment
:func:`make_p1` returns; an in-process update is applied to a copy of p0 when a later stage still
needs p0, and otherwise to p0's own weights (the caller then drops the name ``model0``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from isdelta.program import stage, stamp_of
from isdelta.run.config import RunConfig
from isdelta.run.data import RunError, sft_rollouts
from isdelta.run.scoring import fused_path, score_stage

__all__ = [
    "check_tokenizers",
    "estimate_inputs",
    "make_p1",
    "p0_sample_stage",
    "probe_stage",
    "sample_stage",
    "score_stage",
    "token_estimates",
    "tokens_stage",
]


def sample_stage(cfg: RunConfig, model, tok, records: list[dict], folder, subdir: str = "samples", inputs: str = ""):
    """Sample with HF ``generate`` in chunks of prompts; each chunk is saved when done and reused on
    resume when its checksums and ``inputs`` (the sampling model's identity) match.

    Returns ``(rollouts, texts, stopped, transform, names)``, ``names`` the saved files.
    """
    return _sample_parts(cfg, lambda: model, tok, records, folder, subdir, inputs, "hf")[:5]


def p0_sample_stage(
    cfg: RunConfig,
    model0,
    tok,
    records: list[dict],
    folder,
    timings: dict | None = None,
    chunks: range | None = None,
    *,
    identity: str,
):
    """p0's samples with ``sampling.backend``: :func:`sample_stage`'s tuple plus ``token_logq``
    (float64 [N, C], the sampler's log q of each token; None with the HF back end, whose sampler
    is p0 itself). ``chunks`` (default: all) are the chunks of ``sampling.prompts_per_batch``
    prompts to sample, by their index in the run (each chunk's seed is its index's): a rank's
    share under torchrun. ``identity`` (p0's content identity) stamps every chunk.

    With ``vllm`` the engine is started only when a chunk is not saved yet, on p0's own weights
    (``model.path`` when it is an HF folder, else p0 saved once under ``<output>/vllm_model``),
    and stopped when sampling is done; its start-up time goes to ``timings["start vLLM"]``.
    """
    backend = cfg.sampling.backend
    if backend == "hf":
        return _sample_parts(cfg, lambda: model0, tok, records, folder, "samples", identity, "hf", chunks)
    engine = _LazyVLLM(cfg, model0, tok, folder.path / "vllm_model", {} if timings is None else timings, identity)
    try:
        return _sample_parts(cfg, engine, tok, records, folder, "samples", identity, backend, chunks)
    finally:
        engine.close()


class _LazyVLLM:
    """Starts vLLM on p0's weights at the first call (a fully resumed run never starts it)."""

    def __init__(self, cfg: RunConfig, model0, tok, cache: Path, timings: dict, identity: str) -> None:
        self.cfg, self.model0, self.tok, self.cache, self.vllm = cfg, model0, tok, cache, None
        self.timings, self.identity = timings, identity

    def __call__(self):
        from isdelta.engine.vllm_sampling import load_vllm, save_for_vllm

        if self.vllm is None:
            m = self.cfg.model
            folder = Path(m.path)
            with stage("start vLLM", self.timings):  # its own line: start-up is not sampling time
                if not folder.is_dir():  # a builtin, a .gguf or a hub id: p0's de-quantised weights
                    source = {"path": m.path, "dtype": m.dtype, "identity": self.identity}
                    folder = save_for_vllm(self.model0, self.tok, self.cache, source)
                self.vllm = load_vllm(folder, dtype=m.dtype, seed=self.cfg.seed)
        return self.vllm

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None


def _sample_parts(
    cfg: RunConfig, get_model, tok, records, folder, subdir: str, inputs: str, backend: str, chunks: range | None = None
):
    """The chunked, resumable sampling loop of :func:`sample_stage` (``get_model()`` gives the
    sampler, called only for a chunk that is not saved) over ``chunks`` (default: every chunk of
    ``records``); returns its tuple plus ``token_logq``."""
    from isdelta.engine import LogitTransform, Rollouts
    from isdelta.engine.samples import Samples
    from isdelta.engine.sampling import sample

    s = cfg.sampling
    transform = LogitTransform(s.temperature, s.top_k, s.top_p)
    folder.subfolder(subdir)
    k = s.prompts_per_batch
    parts, names = [], []
    for c in range(-(-len(records) // k)) if chunks is None else chunks:
        start = c * k
        pt, js = f"{subdir}/part-{c:04d}.pt", f"{subdir}/part-{c:04d}.json"
        names += [pt, js]
        part_inputs = stamp_of([inputs, subdir, c] + ([backend] if backend != "hf" else []))
        part = folder.load((pt, js), part_inputs, Samples.load)
        if part is None:
            part = sample(
                get_model(),
                tok,
                [r["prompt"] for r in records[start : start + k]],
                num_samples=s.num_samples,
                transform=transform,
                max_new_tokens=s.max_new_tokens,
                stop_strings=s.stop_strings,
                seed=cfg.seed * 100_003 + c,
                backend=backend,
            )
            part.save(folder.path / pt)
            folder.record(pt, js, inputs=part_inputs)
        parts.append(part)
    rollouts = Rollouts.concat([p.rollouts for p in parts], pad_token_id=tok.pad_token_id)
    texts = [t for p in parts for t in p.texts]
    stopped = np.concatenate([np.asarray(p.stopped) for p in parts])
    return rollouts, texts, stopped, transform, names, _concat_logq(parts, rollouts)


def _concat_logq(parts, rollouts) -> np.ndarray | None:
    """The parts' ``token_logq`` stacked like ``Rollouts.concat`` stacks their completion columns
    (right-padded with 0), float64 [N, C]; None when the parts carry none."""
    if all(p.token_logq is None for p in parts):
        return None
    C = rollouts.completion_mask.shape[1]
    rows = []
    for p in parts:
        lq = p.token_logq.double().numpy()  # [n, c]
        rows.append(np.pad(lq, ((0, 0), (0, C - lq.shape[1]))))
    return np.concatenate(rows)


def make_p1(cfg: RunConfig, model0, tok, rollouts, texts, records, transform, keep_p0: bool, distributed=False):
    """``(model1, info)``: p1 from a second checkpoint, or p0 after the in-process update step.

    The step is applied to a copy of ``model0`` when ``keep_p0`` (a later stage needs both
    models), else to ``model0``'s own weights: they are p1 afterwards, and the caller must not
    use the name ``model0`` again. ``distributed``: ``rollouts`` and ``records`` are this rank's
    shard (its groups number its records), and the step is taken with every rank's rows.
    """
    if cfg.updated is not None:
        from isdelta.run.shards import placed

        model1, tok1 = placed(cfg.updated, "updated").load("updated")
        check_tokenizers(tok, tok1)
        _check_finite(model1, "updated.path: the checkpoint's weights hold NaN or inf", "check the checkpoint")
        return model1, {"kind": "checkpoint", "path": cfg.updated.path}
    try:
        return _update(cfg, model0, tok, rollouts, texts, records, transform, keep_p0, distributed)
    except FloatingPointError as e:  # the update library's own account of the overflow
        raise RunError(f"update: the step (update.lr {cfg.update.lr:g}) failed", str(e), "lower update.lr") from None


def _update(cfg: RunConfig, model0, tok, rollouts, texts, records, transform, keep_p0: bool, distributed: bool):
    """The in-process step of :func:`make_p1`."""
    import torch

    from isdelta.engine import EngineConfig
    from isdelta.training import REWARDS, update

    u = cfg.update
    model1 = copy.deepcopy(model0) if keep_p0 else model0
    # the update trains on every counted token, EOS included (as trainers do); engine.include_eos
    # only changes what is measured, never p1
    ecfg = EngineConfig.from_transform(transform, token_budget=cfg.engine.token_budget)
    torch.manual_seed(cfg.seed)
    if u.loss == "reinforce":
        answers = [records[g]["answer"] for g in rollouts.group.tolist()]  # present: check_records
        rewards = np.array([REWARDS[u.reward](t, str(a)) for t, a in zip(texts, answers)])
        result = update(
            model1,
            loss="reinforce",
            rollouts=rollouts,
            rewards=rewards,
            optimizer=u.optimizer,
            lr=u.lr,
            steps=u.steps,
            engine_config=ecfg,
            distributed=distributed,
            reference=model0 if keep_p0 else None,
        )
    else:
        result = update(
            model1,
            loss="sft",
            rollouts=sft_rollouts(tok, records, cfg),
            optimizer=u.optimizer,
            lr=u.lr,
            steps=u.steps,
            engine_config=EngineConfig(token_budget=cfg.engine.token_budget),
            distributed=distributed,
            reference=model0 if keep_p0 else None,
        )
    info = {"kind": "update", **result.to_dict()}
    if u.loss == "reinforce":
        info.update(reward=u.reward, samples_per_prompt=cfg.sampling.num_samples)  # mean_reward: all ranks'

    return model1, info


def check_tokenizers(tok0, tok1) -> None:
    """p0's and p1's tokenizers map text to the same ids (RunError naming ``updated.path``)."""
    from isdelta.engine import check_compatible

    try:
        check_compatible(tok0, tok1)
    except ValueError as e:
        raise RunError(
            "updated.path: its tokenizer is not model.path's", str(e).removeprefix("the two models' ")
        ) from None


def _check_finite(model, what: str, fix: str) -> None:
    """RunError when a parameter holds NaN or inf (scores would be NaN, the hint misleading)."""
    import torch

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunError(what, f"{len(bad)} parameter tensors, e.g. {bad[:3]}", fix)


def estimate_inputs(
    cfg: RunConfig, s0: dict, s1: dict, stopped: np.ndarray, token_logq: np.ndarray | None = None
) -> tuple[tuple, dict]:
    """``estimate``'s arguments from the two models' score arrays: ``(args, keywords)``.

    With engine.include_eos=false the stop token leaves S, L and the entropy sums
    (``include="no_eos"``); ``stopped`` then marks rows that end with a counted stop TOKEN (a
    stop-string row has none), else every row the sampler stopped. ``token_logq`` (a sampler q
    ≠ p0, [N, C]) adds ``log_q``: its total over the tokens ``s0["logp"]`` counts, the stop token
    included (the weights use whole sequences, even with ``include="no_eos"``).
    """
    e = cfg.estimator
    kw = {
        "entropy_sum0": s0["entropy_sum"],
        "entropy_sum1": s1["entropy_sum"],
        "weights": e.weights,
        "prompts": e.prompts,
        "level": e.level,
        "clip": e.clip,
        "stopped": stopped,
        "include": "all",
    }
    if not cfg.engine.include_eos:
        kw.update(
            include="no_eos",
            stopped=s0["stopped"],
            eos_logp0=s0["stop_logp"],
            eos_logp1=s1["stop_logp"],
            eos_entropy_sum0=s0["stop_entropy_sum"],
            eos_entropy_sum1=s1["stop_entropy_sum"],
        )
    if token_logq is not None:
        kw["log_q"] = np.where(s0["mask"], token_logq, 0.0).sum(axis=1, dtype=np.float64)  # [N]
    return (s0["logp"], s1["logp"], s0["length"], s0["group"]), kw


def token_estimates(
    cfg: RunConfig, s0: dict, s1: dict, token_logq: np.ndarray | None = None, support: int | None = None
) -> list:
    """The per-decision estimates the headline policy tries first, in its order: ``cv`` (control
    variate, the lowest variance), ``pd`` (plain) and ``pd_sn`` (self-normalised, bounded by the
    data). ``support`` (the vocabulary, or top-k) bounds their per-token entropies: a value past it
    is named in a warning.

    Their masks count the stop token (the prefix ratio must include it), so they run only when
    the run measures all positions (engine.include_eos = true); else the list is empty. With
    ``token_logq`` (a sampler q ≠ p0, [N, C]) both sides are weighted by their ratio to q.
    """
    from isdelta.estimators import estimate_tokens

    if not cfg.engine.include_eos:
        return []
    e = cfg.estimator
    args = (s0["token_logp"], s1["token_logp"], s0["token_entropy"], s1["token_entropy"], s0["mask"], s0["group"])
    q = {} if token_logq is None else {"token_logq": token_logq}  # without q: the call as it always was
    opts = dict(prompts=e.prompts, level=e.level, support_size=support, **q)
    return [estimate_tokens(*args, method=m, **opts) for m in ("cv", "pd", "pd_sn")]


def probe_stage(cfg: RunConfig, model0, model1, rollouts, s0: dict, transform, out: Path) -> dict:
    """ΔH₁ (gradient and function space) against the true ΔH along θ1 − θ0, at every α.

    ``model0`` is moved along the direction and put back at θ0 bit for bit.
    """
    from isdelta.engine import EngineConfig
    from isdelta.probes import parameter_delta, run_probe

    e, p = cfg.estimator, cfg.probe
    ecfg = EngineConfig.from_transform(
        transform,
        include_eos=cfg.engine.include_eos,
        token_budget=cfg.engine.token_budget,
        fused=fused_path(s0, cfg.engine.fused),  # the sweep on p0's path: ΔH(α = 0) = 0 exactly
        progress=False,
    )
    try:
        return run_probe(
            model0,
            parameter_delta(model0, model1),
            rollouts,
            s0,
            alphas=list(p.sweep),
            gradient=p.gradient,
            per_token=p.per_token,
            engine_config=ecfg,
            estimator_kw=dict(weights=e.weights, prompts=e.prompts, level=e.level, clip=e.clip),
            out_dir=out,
            plots=cfg.output.plots,
        )
    except FloatingPointError as e:  # the engine's "non-finite logits" at some θ0 + α(θ1 − θ0)
        raise RunError(
            f"probe: scoring the sweep gave NaN/inf logits ({str(e).split(':')[0]})",
            f"θ0 + α·(θ1 − θ0) at α up to {max(map(abs, p.sweep)):g} moves the weights so far that the logits overflow",
            "lower probe.sweep's largest |α|" + (" or update.lr" if cfg.update is not None else ""),
        ) from None


def tokens_stage(cfg: RunConfig, model0, model1, tok, records, rollouts, transform, folder, p1_id: str) -> dict:
    """Token-level diagnostics of p0 vs p1 on the configured carriers (tokens.csv/json/md, plots).

    Carriers: p0's samples and p1's own (sampled with the same transform and seeds), and/or the
    data's reference responses teacher-forced (built as for the sft update). Each carrier row is
    scored by the run's reward (``tokens.reward``, else ``update.reward``) against its prompt's
    answer, as the update does: the correctness strata (NaN, "unknown", without an answer).
    """
    from isdelta import tokens
    from isdelta.training import REWARDS

    t = cfg.tokens
    carriers, texts = {}, {}
    if t.mode in ("generations", "both"):
        carriers["p0 samples"] = rollouts
        carriers["p1 samples"], texts["p1 samples"] = sample_stage(
            cfg, model1, tok, records, folder, "samples_p1", p1_id
        )[:2]
    if t.mode in ("teacher_forced", "both"):
        why = f"tokens.mode={t.mode} (without responses use tokens.mode=generations)"
        carriers["reference"] = sft_rollouts(tok, records, cfg, why=why)
        texts["reference"] = [str(r["response"]) for r in records]  # one row per record, in order
    opts = t.options(
        transform=transform, include_eos=cfg.engine.include_eos, seed=cfg.seed, token_budget=cfg.engine.token_budget
    )
    reward = REWARDS[opts.reward or (cfg.update.reward if cfg.update is not None else "answer_match")]
    rewards = {}  # one per carrier row, as the update computes it; NaN where the prompt has no answer
    for c, ro in carriers.items():
        if c not in texts:  # p0's samples: decoded as sampling decodes them (special tokens skipped)
            comp, L = ro.completion_ids.cpu(), ro.completion_lengths.cpu().tolist()
            texts[c] = [tok.decode(comp[i, : L[i]].tolist(), skip_special_tokens=True) for i in range(ro.n_rows)]
        answers = [records[g]["answer"] for g in ro.group.tolist()]
        rewards[c] = np.array([np.nan if a is None else reward(x, str(a)) for x, a in zip(texts[c], answers)])
    return tokens.run_tokens(
        model0,
        model1,
        carriers,
        tokenizer=tok,
        options=opts,
        names=("p0", "p1"),
        n_interesting=t.n_interesting,
        out_dir=folder.path,
        plots=cfg.output.plots,
        rewards=rewards,
    )
