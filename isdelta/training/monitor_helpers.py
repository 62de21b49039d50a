"""Helpers of the training-loop monitor: state preservation, prompt keys, row bookkeeping."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from isdelta.engine.logprob import EngineConfig
from isdelta.engine.rollouts import Rollouts
from isdelta.estimators import EntropyDelta
from isdelta.training.distributed import _concat
from isdelta.training.monitor_types import (Snapshot)


# ---------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _preserved(model: torch.nn.Module) -> Iterator[None]:
    """Restore per-module train/eval modes, requires_grad flags, .grad tensors and RNG state."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # fork_rng saves and restores the CPU generator, and these CUDA devices' (only where CUDA is
    # already initialised: touching it would create a context on every GPU)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag, g in zip(params, flags, grads):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if p.grad is not g:
                    p.grad = g


def _default_eos(model: torch.nn.Module) -> int | list[int] | None:
    """The model's stop ids: generation_config first (it may list several), else config."""
    inner = getattr(model, "module", model)
    for cfg in (getattr(inner, "generation_config", None), getattr(inner, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


def _prompt_keys(prompt_ids, prompt_lengths) -> torch.Tensor:
    """A group id per row [N]: a 56-bit hash of the row's real (left-padded) prompt tokens.

    The same prompt gets the same id in every micro-batch and on every rank, whatever its pad
    width; blake2b rather than ``hash()`` so that ids agree across processes.
    """
    ids = torch.as_tensor(prompt_ids).detach().cpu().long().numpy()  # [N, P_len]
    lengths = torch.as_tensor(prompt_lengths).detach().cpu().long().tolist()  # [N]
    width = ids.shape[1]
    keys = [int.from_bytes(hashlib.blake2b(ids[r, width - n:].tobytes(), digest_size=7).digest(), "little")
            for r, n in enumerate(lengths)]
    return torch.tensor(keys, dtype=torch.long)


def _old_logp_tokens(old_logp, rollouts: Rollouts, engine: EngineConfig) -> torch.Tensor:
    """The caller's per-token log p0, checked: [N, C] float64, 0 on uncounted positions."""
    t = torch.as_tensor(old_logp).detach()
    N, C = rollouts.completion_ids.shape
    if tuple(t.shape) != (N, C) or not t.is_floating_point():
        raise ValueError(
            f"old_logp: expected per-token log-probs [N, C] = [{N}, {C}] (one per completion "
            f"column, aligned with completion_ids), floating point; got {t.dtype} "
            f"{list(t.shape)}. Pass the trainer's log-probs of this micro-batch's completion "
            "tokens (TRL: inputs['old_per_token_logps']), or old_logp=None to rescore p0.")
    mask = rollouts.mask(engine.include_eos).to(t.device)  # [N, C]: counted tokens only
    t = torch.where(mask, t.double(), torch.zeros((), dtype=torch.float64, device=t.device))
    bad = ~torch.isfinite(t).all(-1)
    if bad.any():
        raise ValueError(f"old_logp: rows {bad.nonzero().flatten()[:8].tolist()} hold NaN/inf on "
                         "counted tokens; pass finite log-probs or old_logp=None to rescore p0.")
    return t


def _row_sums(token_logp: torch.Tensor) -> np.ndarray:
    """S_i = Σ_t log p [N] float64 (uncounted positions already 0)."""
    return token_logp.sum(-1).cpu().numpy()


# per-position fields [N, C] of the per-decision estimator (0 where not counted)
TOKEN_FIELDS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")


def _rows(snap: Snapshot, p1) -> dict[str, np.ndarray | None]:
    """Per-row arrays of one micro-batch: p0 from the snapshot, p1 from its ``SequenceScores``."""
    ro = snap.rollouts
    rb = snap.entropy_sum0 is not None
    pd = snap.token_entropy0 is not None
    tokens = {k: None for k in TOKEN_FIELDS}
    if pd:
        tokens = {"token_logp0": snap.token_logp0, "token_entropy0": snap.token_entropy0,
                  "token_logp1": p1.token_logp.detach().float().cpu().numpy(),
                  "token_entropy1": p1.token_entropy.detach().float().cpu().numpy(),
                  "mask": p1.mask.detach().cpu().numpy()}
    return {**tokens, "log_p0": np.asarray(snap.log_p0, dtype=np.float64),
            "log_p1": p1.logp.detach().cpu().numpy().astype(np.float64),
            "length": p1.length.detach().cpu().numpy(),
            "group": ro.group.detach().cpu().numpy(),
            "stopped": ro.stopped.detach().cpu().numpy(),
            "entropy_sum0": snap.entropy_sum0 if rb else None,
            "entropy_sum1": p1.entropy_sum.detach().cpu().numpy() if rb else None}


def _merge(parts: list[dict]) -> dict:
    """Concatenate row dicts; RB (per-decision) only when every part has entropy sums (per-position
    entropies). Per-position arrays are right-padded to the widest part (pads are not counted)."""
    if any(p["entropy_sum0"] is None for p in parts):
        parts = [{**p, "entropy_sum0": None, "entropy_sum1": None} for p in parts]
    if any(p["token_entropy0"] is None for p in parts):
        parts = [{**p, **dict.fromkeys(TOKEN_FIELDS)} for p in parts]
    else:
        C = max(p["mask"].shape[1] for p in parts)
        parts = [{**p, **{k: _pad_columns(p[k], C) for k in TOKEN_FIELDS}} for p in parts]
    return _concat(parts)


def _pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """[N, C] → [N, width], zeros (False) on the right."""
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _multi_row_groups(group: np.ndarray) -> np.ndarray:
    """bool [N]: the row's group has at least two rows."""
    _, inv, counts = np.unique(group, return_inverse=True, return_counts=True)
    return counts[inv.reshape(-1)] >= 2


def _verdict(est: EntropyDelta, rb: bool) -> tuple[str, None] | None:
    """Why an estimate is not reported as valid (non-finite ΔH, k̂ > 1), or None."""
    d = est.delta_rb if rb else est.delta
    if not (math.isfinite(d.value) and math.isfinite(d.se)):
        return (f"the ΔH estimate is not finite ({d.value}, se {d.se}).", None)
    if est.khat > 1.0:
        reason = (f"k̂ = {est.khat:.2f} > 1: the importance ratios p1/p0 have infinite variance at "
                  f"this sample size ({est.n_rows} rows), so ΔH and its CI are unreliable. The step "
                  "moved p1 far from p0: use more samples per prompt or a smaller step.")
        return (reason, None)
    return None


def _describe(exc: BaseException, limit: int = 400) -> str:
    """``Type: message``, shortened."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _free_memory(exc: BaseException) -> None:
    """After an out-of-memory error, hand cached blocks back so the training step can go on."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
