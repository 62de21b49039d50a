"""The score program under ``torchrun --nproc-per-node K -m isdelta.score cfg.yaml``.

Rank r scores the texts ``[lo, hi)`` of :func:`isdelta.program.ranks.split` (contiguous, in
corpus order) into its own store, ``models/NAME/ranks/R-of-K/`` (a :class:`ModelStore`: chunk
checksums, resumable), while rank 0 holds the output folder. When every rank has finished,
rank 0 writes ``models/NAME/stats.jsonl`` from the shares in rank order, so the model's folder
is the one a single process writes, and everything after (curriculum, comparison, predictor,
summary) reads it unchanged::

    rank 0  texts [0, n/2)  ─▶ models/a/ranks/0-of-2/stats.jsonl ─┐
    rank 1  texts [n/2, n)  ─▶ models/a/ranks/1-of-2/stats.jsonl ─┴─▶ rank 0: models/a/stats.jsonl
"""

from __future__ import annotations

import json

from isdelta.program.ranks import Ranks
from isdelta.score.store import ModelStore, StoreError

__all__ = ["merge_shards", "shard_store"]


def _shard(store: ModelStore, rank: int, world: int) -> ModelStore:
    s = ModelStore(store.folder / "ranks" / f"{rank}-of-{world}")
    s.stamp = dict(store.stamp)  # the model's settings and the corpus
    return s


def shard_store(store: ModelStore, r: Ranks) -> ModelStore:
    """This rank's store beside the model's own (same stamp: settings and corpus)."""
    return _shard(store, r.rank, r.world)


def merge_shards(cfg, stores: list[ModelStore], finished: list[bool], r: Ranks, timings: dict) -> dict[str, dict]:
    """Rank 0: each model's store written from its ranks' shares (the finished ones kept);
    returns every model's ``done.json`` info."""
    from isdelta.program import stage

    infos = {}
    for name, store, done in zip(cfg.names, stores, finished):
        if done:
            infos[name] = store.done
            continue
        with stage(f"merge {name} ({r.world} ranks)", timings):
            infos[name] = _merge(cfg, store, [_shard(store, k, r.world) for k in range(r.world)])
    return infos


def _merge(cfg, store: ModelStore, shards: list[ModelStore]) -> dict:
    """Rewrite ``store`` from the shards' verified rows, chunk by chunk; its ``done.json`` sums
    their counts and reads the throughput over the slowest rank's time."""
    parts = []
    for s in shards:
        s.open()  # verified again here: rank 0 did not write them
        if s.done is None:
            raise StoreError(
                f"{s.folder}: a rank's share is not complete",
                "it was changed while the run went on",
                "rerun the same command",
            )
        parts.append(s.done)
    store.clear()
    size = cfg.engine.chunk_texts
    for s in shards:
        with open(s.stats_path, encoding="utf-8") as f:
            rows = []
            for line in f:
                rows.append(json.loads(line))
                if len(rows) == size:
                    store.append(rows)
                    rows = []
            if rows:
                store.append(rows)
    t = [p["throughput"] for p in parts]
    texts, tokens = sum(x["texts"] for x in t), sum(x["tokens"] for x in t)
    seconds = max(x["seconds"] for x in t)  # the ranks score side by side
    info = {k: v for k, v in parts[0].items() if k != "stamp"}
    info.update(
        n_texts=sum(p["n_texts"] for p in parts),
        resumed_after=sum(p["resumed_after"] for p in parts),
        ranks=len(parts),
        throughput={
            **t[0],
            "texts": texts,
            "tokens": tokens,
            "seconds": seconds,
            "texts_per_s": texts / seconds if seconds else None,
            "tokens_per_s": tokens / seconds if seconds else None,
        },
    )
    store.finish(info)
    return store.done
