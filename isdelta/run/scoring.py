"""The run's score files: one model's scores of one sample set, saved, reused on resume, and each
scored on a recorded path.

The engine computes the chunk statistics either eagerly or in one compiled pass
(``EngineConfig.fused``, ``engine/fused.py``); the two agree to ~1e-5 relative, not bit for bit, so p0's
and p1's scores of one sample set must come from one path, or ΔH of p1 = p0 is no longer exactly
0. ``engine.fused="auto"`` decides from the call's size, which p0 and p1 share; on top of that
every file records the path its rows took (a per-row bool array ``fused``; per row so that the
ranks' files merge like every other array), and a later file of the same samples (``like``:
p1's after p0's, the probe's sweep after p0's) is scored with ``fused`` set to that path, also
when p0 was scored by an earlier process: a resumed run never flips paths because a kernel
happens to be compiled, or not, in the process that resumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write
from isdelta.program import note
from isdelta.run.config import RunConfig

__all__ = ["fused_path", "score_stage"]


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return dict(z)


def fused_path(scores: dict | None, default: str) -> str:
    """``EngineConfig.fused`` that scores the samples of ``scores`` again on their path: "on" or
    "off" as their ``fused`` array records; ``default`` when there is none (no scores, or a file
    saved before paths were recorded, whose path ``default`` decided by the call's size)."""
    if scores is None or "fused" not in scores:
        return default
    return "on" if np.all(scores["fused"]) else "off"


def score_stage(
    cfg: RunConfig, model, rollouts, transform, folder, name: str, inputs: str, like: dict | None = None
) -> dict | None:
    """Scores as numpy arrays, saved as ``name`` (npz) and reused on resume when verified;
    None when no verified copy exists and ``model`` is None (the caller makes p1 first).

    ``like``: scores of the same samples already saved (p0's, when these are p1's): these are
    scored on the path they record. The arrays gain ``fused`` [N] (bool): the path taken.
    """
    saved = folder.load(name, inputs, _read_npz)
    if saved is not None or model is None:
        return saved
    from isdelta.engine import EngineConfig, LogProbEngine, SplitLM

    # Always score whole sequences: the importance weights need the full ratio (p0 sampled the
    # stop token too); engine.include_eos=false is applied in the estimator (include="no_eos").
    ecfg = EngineConfig.from_transform(
        transform, include_eos=True, token_budget=cfg.engine.token_budget, fused=fused_path(like, cfg.engine.fused)
    )
    engine, lm = LogProbEngine(ecfg), SplitLM.of(model)
    arrays = engine.score(model, rollouts).to_numpy()
    n_logits = int(arrays["length"].sum()) * lm.vocab_size
    arrays["fused"] = np.full(len(arrays["logp"]), engine.fuses(n_logits, lm.device))  # False: compile failed
    if fused_path(like, "off") == "on" and not arrays["fused"].all():  # a compiler there, none here
        note(
            f"{name}: torch.compile failed in this process, so these scores took the eager chunk "
            "statistics while the saved ones they are compared with took the compiled pass: they "
            "agree to ~1e-5 relative, not bit for bit (delete both files to rescore both eagerly)"
        )
    atomic_write(folder.path / name, lambda f: np.savez(f, **arrays))
    folder.record(name, inputs=inputs)
    return arrays
