"""Scoring the corpus under each configured model, into its result folder (resumable).

Every text is scored teacher-forced (:mod:`isdelta.score.scorer`) in chunks of
``engine.chunk_texts`` and appended to ``OUT/models/NAME/stats.jsonl`` as each chunk finishes
(:class:`isdelta.score.store.ModelStore`); under ``torchrun`` each rank scores its share of the
texts (:mod:`isdelta.score.shards`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from isdelta.program import ProgramError, stage
from isdelta.program.identity import model_identity
from isdelta.program.ranks import say, split

__all__ = ["check_finite", "model_store", "placed", "score_models", "score_one"]


def model_store(cfg, out: Path, i: int, corpus_hash: str = ""):
    """Model i's result folder (``corpus_hash`` given: ready to be opened and written)."""
    from isdelta.score.store import ModelStore, stamp_of

    m = cfg.models[i]
    # what the scores depend on: the model entry and the data section (the name is the folder
    # itself; engine.token_budget / chunk_texts are left out: scores do not depend on batching)
    key = {"model": m.model_dump(mode="json", exclude={"name"}), "data": cfg.data.model_dump(mode="json")}
    # to be written: the weights' content identity too (a model rewritten in place is rescored)
    identity = model_identity(m, f"models.{i}") if corpus_hash else ""
    return ModelStore(out / "models" / cfg.names[i], stamp_of(key), corpus_hash, identity)


# ---------------------------------------------------------------------------- scoring
def score_models(cfg, out: Path, timings: dict, corpus_hash: str = "", n_texts: int | None = None) -> dict[str, dict]:
    """Score the corpus under every model (resuming); return each model's ``done.json`` info.

    Consecutive entries that share path, dtype and device (e.g. one model at two temperatures)
    reuse the loaded weights. Under ``torchrun`` (``n_texts``, the corpus's size, given) each
    rank scores a contiguous share of the texts into ``models/NAME/ranks/R-of-K/`` (resuming
    from it), and rank 0 then writes ``models/NAME/`` from the shares in order
    (:func:`isdelta.score.shards.merge_shards`); the others return ``{}``.
    """
    from isdelta.program.ranks import ranks

    r = ranks()
    stores = [model_store(cfg, out, i, corpus_hash) for i in range(len(cfg.models))]
    if r.world == 1:
        todo = [s.open() for s in stores]  # every folder checked before any model is loaded
        return _score_stores(cfg, cfg.names, stores, todo, timings, None)
    from isdelta.score.shards import merge_shards, shard_store

    # rank 0 checks the models' folders (stamps, saved scores) before any rank writes in them
    finished = r.gather(r.agree(lambda: _finished(stores) if r.root else None))[0]
    for name, store, f in zip(cfg.names, stores, finished):
        if f:
            say(f"[isdelta] {name}: all texts already scored ({store.stats_path})")
    names = [n for n, f in zip(cfg.names, finished) if not f]
    shards = [shard_store(stores[cfg.names.index(n)], r) for n in names]
    span = split(n_texts, r.world, r.rank)
    r.agree(lambda: _score_stores(cfg, names, shards, [s.open() for s in shards], timings, span))
    return r.agree(lambda: merge_shards(cfg, stores, finished, r, timings) if r.root else {})


def _finished(stores) -> list[bool]:
    """Open (check) every model's folder; whether each holds every text's scores."""
    for s in stores:
        s.open()
    return [s.done is not None for s in stores]


def _score_stores(cfg, names, stores, n_done_all, timings, span) -> dict[str, dict]:
    """Score each named model into its store from its ``n_done`` texts on (within ``span``)."""
    infos, loaded = {}, None
    for name, store, n_done in zip(names, stores, n_done_all):
        i = cfg.names.index(name)
        m = cfg.models[i]
        if store.done is not None:
            say(f"[isdelta] {name}: all texts already scored ({store.stats_path})")
            infos[name] = store.done
            continue
        load_key = (m.path, m.dtype, m.device, m.trust_remote_code, m.allow_download)
        if loaded is None or loaded[0] != load_key:
            loaded = None  # the only reference: the previous weights are freed before the next load
            with stage(f"load {name} ({m.path})", timings):
                loaded = (load_key, *placed(m, f"models.{i}").load(f"models.{i}"))
        with stage(f"score {name}", timings):
            infos[name] = score_one(cfg, name, m, loaded[1], loaded[2], store, n_done, span)
    return infos


def placed(m, key: str):
    """The model entry on this rank's device (``cuda`` is ``cuda:LOCAL_RANK`` under torchrun)."""
    from isdelta.program.ranks import ranks

    return m.model_copy(update={"device": ranks().device(m.device, key)})


def score_one(cfg, name: str, m, model, tok, store, n_done: int, span: tuple[int, int] | None = None) -> dict:
    """Stream the corpus through one model, appending stats chunk by chunk after ``n_done`` texts
    (of ``span``, the texts ``[lo, hi)`` a rank scores; default: all)."""
    from isdelta.engine import EngineConfig, LogProbEngine
    from isdelta.score.corpus import chunked, iter_records, resolve_path
    from isdelta.score.scorer import Encoder, max_positions, score_chunk
    from isdelta.score.store import stamp_of

    key = f"models.{cfg.names.index(name)}"
    engine = LogProbEngine(
        EngineConfig(temperature=m.temperature, include_eos=True, token_budget=cfg.engine.token_budget, progress=False)
    )
    encoder = Encoder(tok, cfg.data, max_positions(model))
    lo, hi = span or (0, None)
    records = (
        r
        for r in iter_records(cfg.data, resolve_path(cfg.data.path))
        if r.index >= lo + n_done and (hi is None or r.index < hi)
    )
    seconds, n_texts, n_tokens = 0.0, 0, 0
    for chunk in chunked(records, cfg.engine.chunk_texts):
        t0 = time.perf_counter()
        try:
            rows = score_chunk(model, engine, encoder, chunk)
        except FloatingPointError as e:  # the engine's "non-finite logits"
            raise _non_finite(key, m, str(e).split(":")[0], "the model's logits are NaN/inf") from None
        check_finite(rows, key, m)  # before anything of the chunk is saved
        seconds += time.perf_counter() - t0
        store.append(rows)
        n_texts += len(rows)
        n_tokens += sum(r["n_tokens"] for r in rows)
        say(
            f"[isdelta] {name}: {rows[-1]['index'] + 1 - lo} texts scored{'' if span is None else ' (rank 0)'} "
            f"({n_texts / max(seconds, 1e-9):.1f} texts/s, {n_tokens / max(seconds, 1e-9):.0f} tokens/s)"
        )
    vocab = sorted(tok.get_vocab().items())
    info = {
        "name": name,
        "path": m.path,
        "temperature": m.temperature,
        "dtype": m.dtype,
        "device": str(next(model.parameters()).device),
        "n_texts": n_done + n_texts,
        "resumed_after": n_done,
        "throughput": {
            "texts": n_texts,
            "tokens": n_tokens,
            "seconds": seconds,
            "texts_per_s": n_texts / seconds if seconds else None,
            "tokens_per_s": n_tokens / seconds if seconds else None,
            "token_budget": cfg.engine.token_budget,
            "chunk_texts": cfg.engine.chunk_texts,
        },
        "tokenizer": stamp_of([vocab, tok.bos_token_id, tok.eos_token_id]),
    }
    store.finish(info)
    return info


def check_finite(rows: list[dict], key: str, m) -> None:
    """ProgramError (exit 2) when a scored text's statistics are NaN or inf: the chunk is not saved,
    and no summary reports a corpus of NaN as measured."""
    for r in rows:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if r["n_tokens"] and bad:
            shown = ", ".join(f"{k} {r[k]}" for k in bad[:3]) + (" …" if len(bad) > 3 else "")
            raise _non_finite(key, m, f"text {r['id']!r} (corpus row {r['index']}) gave {shown}", "")


def _non_finite(key: str, m, what: str, cause: str) -> ProgramError:
    """The error for statistics that are not finite, with the likely cause for this model entry."""
    T = m.temperature
    why = cause or (
        f"the engine's float32 statistics overflowed: the logits divided by the temperature {T:g} leave float32's "
        "range (3.4e38; 1.8e19 for log p, which the varentropy squares): a model with exploding logits, or broken "
        "weights"
    )
    if m.dtype == "float16":
        fix = f"set {key}.dtype: float32 or bfloat16"
    else:
        fix = f"check the weights at {key}.path (at temperature {T:g}, logit gaps above {1.8e19 * T:.2g} overflow)"
        fix += f", or raise {key}.temperature" if T < 1 else ""
    return ProgramError(f"{key} ({m.path}): scoring failed, {what}", why, fix)
