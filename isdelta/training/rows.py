"""The monitor's per-row arrays: p0's snapshot of a micro-batch, the rows it becomes after the
p1 forward, and their merging across micro-batches and ranks.

Per row [N] (S = log p summed over counted tokens, DESIGN.md §4): ``log_p0``, ``log_p1``,
``length``, ``group``, ``stopped``, ``entropy_sum0``, ``entropy_sum1``; per position [N, C]
(:data:`TOKEN_FIELDS`, 0 where not counted) for the per-decision estimator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from isdelta.engine.logprob import EngineConfig
from isdelta.engine.rollouts import Rollouts
from isdelta.training.distributed import concat_rows

__all__ = [
    "TOKEN_FIELDS",
    "Snapshot",
    "merge",
    "multi_row_groups",
    "old_logp_tensor",
    "old_logp_tokens",
    "prompt_keys",
    "row_sums",
    "rows_of",
]

# per-position fields [N, C] of the per-decision estimator (0 where not counted)
TOKEN_FIELDS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")


@dataclass(frozen=True)
class Snapshot:
    """p0's side of one micro-batch, taken by :meth:`EntropyMonitor.before`.

    Attributes
    ----------
    step : int
        The monitor's step index (counts ``after`` calls).
    measured : bool
        False when ``every`` skips this step (nothing was scored).
    rollouts : Rollouts or None
        The rows, in the isdelta layout (group ids already keyed, see ``group_by``).
    log_p0 : ndarray float64 [N] or None
        S0_i = Σ_t log p0(x_it) over counted tokens.
    entropy_sum0 : ndarray float64 [N] or None
        Σ_t H(p0(· | x_<t)) along each row (None: plain estimates only).
    reused_old_logp : bool
        S0 came from the caller's ``old_logp`` (no p0 forward was run).
    old_logp_gap : float or None
        max |old_logp − engine log p0| over counted tokens (``rao_blackwell="always"`` only).
    token_logp0, token_entropy0 : ndarray float32 [N, C] or None
        Per-position log p0 of the sampled token and entropy of p0's next-token distribution
        (0 where not counted), for the per-decision estimator; None when no p0 forward ran.
    seconds : float
        Wall time of ``before``.
    error : str or None
        Why the micro-batch could not be measured (non-strict mode: input the checks refused, or a
        failed p0 forward); ``after`` turns it into an invalid result with this reason.
    monitor : str or None
        The token of the monitor that took it: another monitor's ``after`` refuses it.
    notes : tuple of str
        What the input checks corrected or set aside (a mask missing its stop tokens, ``old_logp``
        not reused); ``after`` adds them to the result's warnings.
    """

    step: int
    measured: bool
    rollouts: Rollouts | None = None
    log_p0: np.ndarray | None = None
    entropy_sum0: np.ndarray | None = None
    reused_old_logp: bool = False
    old_logp_gap: float | None = None
    token_logp0: np.ndarray | None = None
    token_entropy0: np.ndarray | None = None
    seconds: float = 0.0
    error: str | None = None
    monitor: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def n_rows(self) -> int:
        return 0 if self.rollouts is None else self.rollouts.n_rows

    def to_dict(self) -> dict:
        """Summary without per-row data."""
        return {
            "step": self.step,
            "measured": self.measured,
            "n_rows": self.n_rows,
            "rao_blackwell": self.entropy_sum0 is not None,
            "per_decision": self.token_entropy0 is not None,
            "reused_old_logp": self.reused_old_logp,
            "old_logp_gap": self.old_logp_gap,
            "seconds": self.seconds,
            "error": self.error,
            "notes": list(self.notes),
        }


def prompt_keys(prompt_ids, prompt_lengths) -> torch.Tensor:
    """A group id per row [N]: a 56-bit hash of the row's real (left-padded) prompt tokens.

    The same prompt gets the same id in every micro-batch and on every rank, whatever its pad
    width; blake2b rather than ``hash()`` so that ids agree across processes.
    """
    ids = torch.as_tensor(prompt_ids).detach().cpu().long().numpy()  # [N, P_len]
    lengths = torch.as_tensor(prompt_lengths).detach().cpu().long().tolist()  # [N]
    width = ids.shape[1]
    keys = [
        int.from_bytes(hashlib.blake2b(ids[r, width - n :].tobytes(), digest_size=7).digest(), "little")
        for r, n in enumerate(lengths)
    ]
    return torch.tensor(keys, dtype=torch.long)


def old_logp_tensor(old_logp, N: int, C: int) -> torch.Tensor:
    """The caller's per-token log p0 as a floating tensor [N, C]; a ``TypeError``/``ValueError`` naming
    ``old_logp`` otherwise."""
    try:
        t = torch.as_tensor(old_logp).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"old_logp: expected a tensor or array of per-token log-probs [N, C] = [{N}, {C}]; got "
            f"{type(old_logp).__name__}. Pass the trainer's log-probs of the completion tokens, or old_logp=None."
        ) from e
    if tuple(t.shape) != (N, C) or not t.is_floating_point():
        raise ValueError(
            f"old_logp: expected per-token log-probs [N, C] = [{N}, {C}] (one per completion "
            f"column, aligned with completion_ids), floating point; got {t.dtype} "
            f"{list(t.shape)}. Pass the trainer's log-probs of this micro-batch's completion "
            "tokens (TRL: inputs['old_per_token_logps']), or old_logp=None to rescore p0."
        )
    return t


def old_logp_tokens(old_logp, rollouts: Rollouts, engine: EngineConfig) -> torch.Tensor:
    """The caller's per-token log p0, checked: [N, C] float64, 0 on uncounted positions."""
    t = old_logp_tensor(old_logp, *rollouts.completion_ids.shape)
    mask = rollouts.mask(engine.include_eos).to(t.device)  # [N, C]: counted tokens only
    t = torch.where(mask, t.double(), torch.zeros((), dtype=torch.float64, device=t.device))
    bad = ~torch.isfinite(t).all(-1)
    if bad.any():
        raise ValueError(
            f"old_logp: rows {bad.nonzero().flatten()[:8].tolist()} hold NaN/inf on "
            "counted tokens; pass finite log-probs or old_logp=None to rescore p0."
        )
    return t


def row_sums(token_logp: torch.Tensor) -> np.ndarray:
    """S_i = Σ_t log p [N] float64 (uncounted positions already 0)."""
    return token_logp.sum(-1).cpu().numpy()


def rows_of(snap: Snapshot, p1) -> dict[str, np.ndarray | None]:
    """Per-row arrays of one micro-batch: p0 from the snapshot, p1 from its ``SequenceScores``."""
    ro = snap.rollouts
    rb = snap.entropy_sum0 is not None
    pd = snap.token_entropy0 is not None
    tokens = {k: None for k in TOKEN_FIELDS}
    if pd:
        tokens = {
            "token_logp0": snap.token_logp0,
            "token_entropy0": snap.token_entropy0,
            "token_logp1": p1.token_logp.detach().float().cpu().numpy(),
            "token_entropy1": p1.token_entropy.detach().float().cpu().numpy(),
            "mask": p1.mask.detach().cpu().numpy(),
        }
    return {
        **tokens,
        "log_p0": np.asarray(snap.log_p0, dtype=np.float64),
        "log_p1": p1.logp.detach().cpu().numpy().astype(np.float64),
        "length": p1.length.detach().cpu().numpy(),
        "group": ro.group.detach().cpu().numpy(),
        "stopped": ro.stopped.detach().cpu().numpy(),
        "entropy_sum0": snap.entropy_sum0 if rb else None,
        "entropy_sum1": p1.entropy_sum.detach().cpu().numpy() if rb else None,
    }


def merge(parts: list[dict]) -> dict:
    """Concatenate row dicts; RB (per-decision) only when every part has entropy sums (per-position
    entropies). Per-position arrays are right-padded to the widest part (pads are not counted)."""
    if any(p["entropy_sum0"] is None for p in parts):
        parts = [{**p, "entropy_sum0": None, "entropy_sum1": None} for p in parts]
    if any(p["token_entropy0"] is None for p in parts):
        parts = [{**p, **dict.fromkeys(TOKEN_FIELDS)} for p in parts]
    else:
        C = max(p["mask"].shape[1] for p in parts)
        parts = [{**p, **{k: _pad_columns(p[k], C) for k in TOKEN_FIELDS}} for p in parts]
    return concat_rows(parts)


def _pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """[N, C] → [N, width], zeros (False) on the right."""
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def multi_row_groups(group: np.ndarray) -> np.ndarray:
    """bool [N]: the row's group has at least two rows."""
    _, inv, counts = np.unique(group, return_inverse=True, return_counts=True)
    return counts[inv.reshape(-1)] >= 2
