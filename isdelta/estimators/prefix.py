"""Per-position inputs of the per-decision estimators: validation, prefix log-ratios, and the
per-column self-normalised prefix weights (shared by ``pd_sn`` and the prefix-ESS diagnostic).

Layout, stated once: token arrays are [N, C] (rows × completion columns), rows sorted
prompt-major after :func:`prepare`; per-prompt arrays are [P, C].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from isdelta.estimators import inputs
from isdelta.estimators.fingerprint import RowsFingerprint
from isdelta.estimators.groups import Groups, make_groups

__all__ = ["LOG_MAX", "PrefixRows", "expand", "prefix_ess", "prepare", "sn_weights", "token_arrays"]

# a prefix log-ratio past this is heavy-tailed: pd and cv compute their p1 terms scaled by a shift
# (``per_decision``) and a warning says their per-sequence figures are unbounded
LOG_MAX = 300.0


@dataclass(frozen=True)
class PrefixRows:
    """Validated per-position inputs, float64 [N, C] in prompt-sorted row order."""

    groups: Groups
    mask: np.ndarray  # [N, C] float 0/1
    log_rho: np.ndarray  # [N, C] prefix log-ratio Σ_{s<t} δ_is
    delta: np.ndarray  # [N, C] δ_it, 0 where not counted
    a0: np.ndarray  # [N, C] m·H0, 0 where not counted
    a1: np.ndarray  # [N, C] m·H1, 0 where not counted
    # with a proposal q (log_rho, delta are then p1/q): the p0/q ones, [N, C]; None when q = p0
    log_rho0: np.ndarray | None = None
    delta0: np.ndarray | None = None
    fingerprint: RowsFingerprint | None = None  # the rows as the caller gave them

    def p0_view(self) -> PrefixRows | None:
        """These rows with the p0/q prefix ratios in place of the p1/q ones (None when q = p0):
        every p1 formula applied to it estimates the same quantity under p0."""
        if self.log_rho0 is None:
            return None
        return dataclasses.replace(self, log_rho=self.log_rho0, delta=self.delta0, log_rho0=None, delta0=None)


def _token_array(name: str, x, shape: tuple[int, ...] | None) -> np.ndarray:
    """``x`` as float64 [N, C] (of ``shape`` when given)."""
    if x is None:
        raise TypeError(f"{name}: expected a numeric array [N, C] (rows × completion columns), got None.")
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
    if mask is None:
        raise TypeError(
            f"mask: expected booleans of shape {shape} like token_logp0 (True on counted positions), got None."
        )
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
        why = (
            "q drew every counted token, so log q > −inf there: record the sampler's processed "
            "log-prob of every sampled token; a q with zero mass where p0 > 0 cannot be corrected "
            "by weighting."
            if name == "token_logq"
            else "A -inf log-prob means one model gives the sampled token zero probability: score "
            "both models with the same sampling transform."
        )
        raise ValueError(
            f"{name}: expected finite values at counted positions (mask True), got "
            f"{int(bad.sum())} non-finite at (row, column) {where}. {why}"
        )
    vals = x[m]
    if vals.size and kind == "logp" and vals.max() > inputs.LOGP_TOL:
        raise ValueError(
            f"{name}: expected log-probabilities (≤ 0) at counted positions, got a maximum of "
            f"{vals.max():.4g}; did you pass negative log-likelihoods? Negate them. Entropies in its "
            f"place? {inputs.ORDER}."
        )
    if vals.size and kind == "entropy" and vals.min() < -inputs.LOGP_TOL:
        raise ValueError(
            f"{name}: expected entropies (≥ 0) at counted positions, got a minimum of "
            f"{vals.min():.4g}; pass token_entropy, not log-probs: {inputs.ORDER}."
        )


def token_arrays(arrays: dict, mask) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Validate per-position inputs: {name: [N, C] float64} (the first sets the shape; log-probs
    are every name without "entropy" in it) and the mask as bool [N, C]."""
    out: dict[str, np.ndarray] = {}
    shape = None
    for name, x in arrays.items():
        out[name] = _token_array(name, x, shape)
        shape = out[name].shape
    m = _mask(mask, shape)
    for name, arr in out.items():
        _check_counted(name, arr, m, "entropy" if "entropy" in name else "logp")
    return out, m


def _prefix_sums(delta: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums along the columns, log ρ_t = Σ_{s<t} δ_s, [N, C] -> [N, C]."""
    log_rho = np.zeros_like(delta)
    np.cumsum(delta[:, :-1], axis=1, out=log_rho[:, 1:])
    return log_rho


def prepare(logp0, logp1, ent0, ent1, mask, group, logq=None) -> PrefixRows:
    """Validate, zero the non-counted positions, sort rows prompt-major: :class:`PrefixRows`.

    ``logq`` (the proposal's token log-probs, or None for q = p0) makes δ the p1/q log-ratio
    and adds the p0/q one (``delta0``, ``log_rho0``).
    """
    names = {"token_logp0": logp0, "token_logp1": logp1, "token_entropy0": ent0, "token_entropy1": ent1}
    if logq is not None:
        names["token_logq"] = logq
    arrays, m = token_arrays(names, mask)
    codes, labels = inputs.group_codes(group, m.shape[0])
    groups = make_groups(codes, labels)
    inputs.check_group_sizes(groups)
    # caller order, whole rows: what ``estimate`` on the same rows records (its length, log_p0)
    fingerprint = RowsFingerprint.of(groups, m.sum(axis=1), np.where(m, arrays["token_logp0"], 0.0).sum(axis=1))
    m = groups.sort(m)
    arrays = {k: groups.sort(v) for k, v in arrays.items()}
    base = arrays.get("token_logq", arrays["token_logp0"])  # the sampler's log-probs
    # np.where, not a product: garbage at non-counted positions may be nan or inf.
    delta = np.where(m, arrays["token_logp1"] - base, 0.0)
    delta0 = None if logq is None else np.where(m, arrays["token_logp0"] - base, 0.0)
    return PrefixRows(
        groups=groups,
        mask=m.astype(np.float64),
        log_rho=_prefix_sums(delta),
        delta=delta,
        a0=np.where(m, arrays["token_entropy0"], 0.0),
        a1=np.where(m, arrays["token_entropy1"], 0.0),
        log_rho0=None if delta0 is None else _prefix_sums(delta0),
        delta0=delta0,
        fingerprint=fingerprint,
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
