"""One rank's share of a run under ``torchrun --nproc-per-node K -m isdelta.run cfg.yaml``.

The run's prompts are sampled in chunks of ``sampling.prompts_per_batch``, chunk c with seed
``seed·100003 + c``. Rank r takes a contiguous run of chunks (:func:`isdelta.program.ranks.split`),
so its samples are exactly the one-process run's samples of those prompts, and rank order is
prompt order::

    chunks   0 1 2 │ 3 4        rank 0: sample, score p0 ─┐                       ┌─ score p1 ─┐
    ranks    0 0 0 │ 1 1        rank 1: sample, score p0 ─┴─ update (gradients ──┴─ score p1 ─┴─▶ rank 0:
                                                             summed over ranks)                 merge, estimate, report

Each rank keeps its saved parts (samples, scores, update.json) in its own verified folder,
``OUT/ranks/R-of-K/``, and resumes from them; rank 0 holds ``OUT`` itself (its lock, stamp and
the report). :func:`merge` puts the ranks' rows back in one-process order: completion columns
padded to the widest rank's, prompt groups renumbered after the ranks before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.program.ranks import Ranks, split
from isdelta.run.config import RunConfig
from isdelta.run.data import RunError

__all__ = ["Shard", "check_shardable", "merge", "placed"]


@dataclass(frozen=True)
class Shard:
    """The chunks (and their records) one rank samples, scores and trains on.

    Attributes
    ----------
    ranks : Ranks
    chunks : range
        Indices of the run's chunks of ``sampling.prompts_per_batch`` prompts.
    records : slice
        The records of those chunks.
    """

    ranks: Ranks
    chunks: range
    records: slice

    @classmethod
    def of(cls, cfg: RunConfig, n_records: int, ranks: Ranks) -> Shard:
        k = cfg.sampling.prompts_per_batch
        lo, hi = split(-(-n_records // k), ranks.world, ranks.rank)
        return cls(ranks, range(lo, hi), slice(lo * k, min(hi * k, n_records)))

    @property
    def folder(self) -> str:
        """This rank's folder under the output folder ("" for one process: the output folder itself)."""
        return "" if self.ranks.world == 1 else f"ranks/{self.ranks.rank}-of-{self.ranks.world}"


def placed(section, key: str):
    """A model section on this rank's device (``cuda`` is ``cuda:LOCAL_RANK`` under torchrun)."""
    from isdelta.program.ranks import ranks

    return section.model_copy(update={"device": ranks().device(section.device, key)})


def check_shardable(cfg: RunConfig, n_records: int, ranks: Ranks) -> None:
    """RunError when this config cannot run on ``ranks.world`` processes (before any work)."""
    if ranks.world == 1:
        return
    K = ranks.world
    fix = "run it in one process (python -m isdelta.run), or remove that section"
    for key, on in (("probe", cfg.probe), ("tokens", cfg.tokens), ("checkpoints", cfg.checkpoints)):
        if on is not None:
            raise RunError(
                f"{key}: not available with torchrun ({K} processes)", "it needs every row in one process", fix
            )
    if cfg.sampling.backend != "hf":
        raise RunError(
            f"sampling.backend {cfg.sampling.backend}: not available with torchrun ({K} processes)",
            "each rank would start its own engine beside the process group",
            "use sampling.backend: hf with torchrun, or vLLM in one process",
        )
    n_chunks = -(-n_records // cfg.sampling.prompts_per_batch)
    if n_chunks < K:
        raise RunError(
            f"torchrun with {K} processes: the data's {n_records} prompts make {n_chunks} chunk(s) of "
            f"sampling.prompts_per_batch {cfg.sampling.prompts_per_batch}",
            "each rank needs at least one chunk",
            f"set sampling.prompts_per_batch ≤ {max(n_records // K, 1)}, or use fewer processes",
        )
    ranks.device(cfg.model.device, "model")  # an explicit cuda:N on every rank is refused


def merge(parts: list[dict]) -> dict:
    """The ranks' local results (rank order) as one process would have them.

    Each part holds ``s0``/``s1`` (score arrays), ``texts``, ``stopped``, ``token_logq`` (or
    None) and ``update``. [N, C] arrays are right-padded with zeros (False for ``mask``) to the
    widest C; ``group`` is shifted past the prompts of the ranks before.
    """
    if len(parts) == 1:
        return parts[0]
    C = max(p["s0"]["mask"].shape[1] for p in parts)
    offsets = np.cumsum([0] + [int(p["s0"]["group"].max()) + 1 for p in parts[:-1]])
    out = {"texts": [t for p in parts for t in p["texts"]], "update": parts[0]["update"]}
    out["stopped"] = np.concatenate([np.asarray(p["stopped"]) for p in parts])
    for side in ("s0", "s1"):
        merged = {}
        for key in parts[0][side]:
            rows = [_widen(p[side][key], C) for p in parts]
            if key == "group":
                rows = [g + off for g, off in zip(rows, offsets)]
            merged[key] = np.concatenate(rows)
        out[side] = merged
    lq = [p["token_logq"] for p in parts]
    out["token_logq"] = None if all(x is None for x in lq) else np.concatenate([_widen(x, C) for x in lq])
    return out


def _widen(a: np.ndarray, C: int) -> np.ndarray:
    """A per-row array; a [n, c] one right-padded with zeros to [n, C]."""
    return a if a.ndim < 2 else np.pad(a, ((0, 0), (0, C - a.shape[1])))
