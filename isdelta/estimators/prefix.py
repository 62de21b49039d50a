"""Per-position inputs of the per-decision estimators: validation, prefix log-ratios, and the
per-column self-normalised prefix weights (shared by ``pd_sn`` and the prefix-ESS diagnostic).

Layout, stated once: token arrays are [N, C] (rows × completion columns), rows sorted
prompt-major after :func:`prepare`; per-prompt arrays are [P, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.estimators import inputs
from isdelta.estimators.groups import Groups, make_groups

__all__ = ["PrefixRows", "expand", "prefix_ess", "prepare", "sn_weights"]


@dataclass(frozen=True)
class PrefixRows:
    """Validated per-position inputs, float64 [N, C] in prompt-sorted row order."""

    groups: Groups
    mask: np.ndarray  # [N, C] float 0/1
    log_rho: np.ndarray  # [N, C] prefix log-ratio Σ_{s<t} δ_is
    delta: np.ndarray  # [N, C] δ_it, 0 where not counted
    a0: np.ndarray  # [N, C] m·H0, 0 where not counted
    a1: np.ndarray  # [N, C] m·H1, 0 where not counted


def _token_array(name: str, x, shape: tuple[int, ...] | None) -> np.ndarray:
    """``x`` as float64 [N, C] (of ``shape`` when given)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a numeric array [N, C], got {type(x).__name__}.") from e
    if arr.ndim != 2 or (shape is not None and arr.shape != shape):
        want = f"{shape} like token_logp0" if shape else "[N, C] (rows × completion columns)"
        raise ValueError(
            f"{name}: expected a 2-D array of shape {want}, got shape {arr.shape}; pass the "
            "engine's per-position arrays (SequenceScores.to_numpy()), not per-row totals."
        )
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least 2 rows and 1 column, got shape {arr.shape}.")
    return arr


def _mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask: expected shape {shape} like token_logp0 (True on counted positions), got {arr.shape}.")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(
            f"mask: expected booleans or 0/1 (counted positions), got dtype {arr.dtype} with "
            "other values; pass the engine's `mask`, not an attention mask or token ids."
        )
    return arr.astype(bool)


def _check_counted(name: str, x: np.ndarray, m: np.ndarray, kind: str) -> None:
    """Finite at counted positions; log-probs ≤ 0, entropies ≥ 0 there (float32 slack)."""
    bad = m & ~np.isfinite(x)
    if bad.any():
        where = [tuple(int(v) for v in rc) for rc in np.argwhere(bad)[:5]]
        raise ValueError(
            f"{name}: expected finite values at counted positions (mask True), got "
            f"{int(bad.sum())} non-finite at (row, column) {where}. A -inf log-prob means one "
            "model gives the sampled token zero probability: score both models with the same "
            "sampling transform."
        )
    vals = x[m]
    if vals.size and kind == "logp" and vals.max() > inputs.LOGP_TOL:
        raise ValueError(
            f"{name}: expected log-probabilities (≤ 0) at counted positions, got a maximum of "
            f"{vals.max():.4g}; did you pass negative log-likelihoods? Negate them."
        )
    if vals.size and kind == "entropy" and vals.min() < -inputs.LOGP_TOL:
        raise ValueError(
            f"{name}: expected entropies (≥ 0) at counted positions, got a minimum of "
            f"{vals.min():.4g}; pass token_entropy, not log-probs."
        )


def prepare(logp0, logp1, ent0, ent1, mask, group) -> PrefixRows:
    """Validate, zero the non-counted positions, sort rows prompt-major: :class:`PrefixRows`."""
    lp0 = _token_array("token_logp0", logp0, None)
    shape = lp0.shape
    arrays = {"token_logp0": lp0}
    for name, x in (("token_logp1", logp1), ("token_entropy0", ent0), ("token_entropy1", ent1)):
        arrays[name] = _token_array(name, x, shape)
    m = _mask(mask, shape)
    for name, arr in arrays.items():
        _check_counted(name, arr, m, "logp" if "logp" in name else "entropy")
    codes, labels = inputs.group_codes(group, shape[0])
    groups = make_groups(codes, labels)
    inputs.check_group_sizes(groups)
    m = groups.sort(m)
    arrays = {k: groups.sort(v) for k, v in arrays.items()}
    # np.where, not a product: garbage at non-counted positions may be nan or inf.
    delta = np.where(m, arrays["token_logp1"] - arrays["token_logp0"], 0.0)
    log_rho = np.zeros_like(delta)
    np.cumsum(delta[:, :-1], axis=1, out=log_rho[:, 1:])  # exclusive prefix sum, [N, C]
    return PrefixRows(
        groups=groups,
        mask=m.astype(np.float64),
        log_rho=log_rho,
        delta=delta,
        a0=np.where(m, arrays["token_entropy0"], 0.0),
        a1=np.where(m, arrays["token_entropy1"], 0.0),
    )


def expand(groups: Groups, per_prompt: np.ndarray) -> np.ndarray:
    """[P, ...] -> [N, ...], each prompt's entry repeated over its rows."""
    return np.repeat(per_prompt, groups.sizes, axis=0)


def sn_weights(tok: PrefixRows) -> np.ndarray:
    """ρ_it / mean_{j∈p} ρ_jt, [N, C], in log space (per-column logsumexp within prompts)."""
    g = tok.groups
    top = np.maximum.reduceat(tok.log_rho, g.starts, axis=0)  # [P, C]
    shifted = np.exp(tok.log_rho - expand(g, top))
    log_mean = top + np.log(g.sum(shifted) / g.sizes[:, None])  # log mean_j ρ_jt, [P, C]
    return np.exp(tok.log_rho - expand(g, log_mean))


def prefix_ess(tok: PrefixRows) -> tuple[np.ndarray, np.ndarray]:
    """ESS_pt = (Σ_i ρ_it)² / Σ_i ρ_it², and whether some row of prompt p counts column t;
    [P, C] each."""
    g = tok.groups
    w = sn_weights(tok)  # ρ / mean_p ρ, [N, C]
    return g.sizes[:, None] ** 2 / g.sum(w * w), g.sum(tok.mask) > 0
