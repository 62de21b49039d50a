"""Input checking for the estimators: shapes, finiteness, signs, options, groups.

Every error names the argument, the expected shape or value, what arrived, and a fix, because
these arrays usually come from a long scoring run and a silent broadcast or a NaN would
otherwise surface as a plausible-looking wrong entropy.

Layouts accepted: 1-D [N] rows with an optional ``group`` [N], or 2-D [P, G] (row p = prompt,
equal G). Everything is flattened to [N] float64 in prompt-sorted order for the estimators.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.estimators.fingerprint import RowsFingerprint
from isdelta.estimators.groups import Groups, make_groups
from isdelta.estimators.options import SCHEMES, Scheme, check_options, check_support_size

__all__ = [
    "SCHEMES",
    "Rows",
    "Scheme",
    "as_rows",
    "check_group_sizes",
    "check_options",
    "check_support_size",
    "group_codes",
    "layout",
    "prepare",
    "prompt_groups",
]

# Per-token log-probs are float32 in the engine; a sum of 10^4 of them that should be ≤ 0 can
# round slightly above 0. Anything above this is a sign error (NLL passed for log-prob).
LOGP_TOL = 1e-3


@dataclass(frozen=True)
class Rows:
    """Validated rows in prompt-sorted order, float64, shape [N] each.

    ``log_r`` = log_p1 − log_p0 of the full sequences (the weights always use every sampled
    token, EOS included: the proposal is the distribution of complete sequences).
    ``s0``, ``s1``, ``length``, ``ent0``, ``ent1`` are the *counted* quantities: with
    ``include="no_eos"`` the stop position is already subtracted from them.
    ``log_r0q`` = log_p0 − log_q and ``log_r1q`` = log_p1 − log_q (full sequences): the
    log-ratios of the H0 and H1 weights when the rows were drawn from a proposal q; None
    when q = p0 (no ``log_q``).
    ``fingerprint`` identifies the rows as the caller gave them (N, layout, lengths with the
    stop token, log p0 of the whole row): results of different rows are never combined.
    ``delta`` = s1 − s0, the counted log-ratio δ', where it differs from ``log_r`` (some row's
    stop token excluded); None where the two are the same floats.
    """

    groups: Groups
    log_r: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    length: np.ndarray
    ent0: np.ndarray | None
    ent1: np.ndarray | None
    stopped: np.ndarray | None
    log_r0q: np.ndarray | None = None
    log_r1q: np.ndarray | None = None
    fingerprint: RowsFingerprint | None = None
    delta: np.ndarray | None = None


# Appended to the errors that arise when per-row arrays come in the wrong order.
ORDER = (
    "check the order: estimate(log_p0, log_p1, length, group), estimate_tokens(token_logp0, "
    "token_logp1, token_entropy0, token_entropy1, mask, group)"
)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_rows(name: str, x, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as float64 of exactly ``shape`` (or any 1-D / 2-D shape when None), raveled."""
    if x is None:
        raise TypeError(f"{name}: expected a numeric array (one entry per sampled row), got None.")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a numeric array, got {type(x).__name__}.") from e
    if shape is None and arr.ndim not in (1, 2):
        raise ValueError(
            f"{name}: expected a 1-D array [N] (with `group`) or a 2-D array [P, G], got shape "
            f"{_shape_str(arr.shape)}; pass per-row totals, not per-token values."
        )
    if shape is not None and arr.shape != shape:
        raise ValueError(
            f"{name}: expected shape {_shape_str(shape)} like log_p0, got "
            f"{_shape_str(arr.shape)}; every per-row array must have one entry per sampled row."
        )
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least 2 rows, got an empty array.")
    return arr.reshape(-1)


def check_finite(name: str, x: np.ndarray, hint: str = "") -> None:
    """Raise if any entry of ``x`` is nan or ±inf, listing the first offending rows."""
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        kinds = sorted({"nan" if np.isnan(v) else ("inf" if v > 0 else "-inf") for v in x[rows]})
        raise ValueError(
            f"{name}: expected finite values, got {rows.size} non-finite ({'/'.join(kinds)}) at "
            f"rows {rows[:5].tolist()}{' ...' if rows.size > 5 else ''}. {hint}".rstrip()
        )


def _check_logp(name: str, x: np.ndarray) -> None:
    check_finite(
        name,
        x,
        "A -inf log-prob means the model gives a sampled sequence zero probability (top-k/top-p "
        "truncation of one model only?): score both models with the same sampling transform, "
        "or without truncation; nan usually comes from a masked position that was summed.",
    )
    if x.max() > LOGP_TOL:
        raise ValueError(
            f"{name}: expected log-probabilities (≤ 0), got a maximum of {x.max():.4g}; did you "
            f"pass negative log-likelihoods? Negate them. Lengths or entropy sums in its place? {ORDER}."
        )


def _log_q(log_q, shape) -> np.ndarray:
    """The proposal's sequence log-probs, [N]: finite (q drew every row) and ≤ 0."""
    arr = as_rows("log_q", log_q, shape)
    check_finite(
        "log_q",
        arr,
        "Each row was drawn from q, so q(x) > 0: a -inf means the sampler's log-probs were not "
        "recorded for every sampled token (or q gives zero mass where p0 > 0, which importance "
        "weighting by p0/q cannot correct); pass the sampler's processed log-probs, summed over "
        "the same tokens as log_p0, or omit log_q when the rows come from p0 itself.",
    )
    if arr.max() > LOGP_TOL:
        raise ValueError(
            f"log_q: expected log-probabilities (≤ 0), got a maximum of {arr.max():.4g}; did you "
            "pass negative log-likelihoods? Negate them."
        )
    return arr


def group_codes(group, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes in [0, P) and sorted labels for a ``group`` array of length n (None: 1)."""
    if group is None:
        return np.zeros(n, dtype=np.int64), np.zeros(1, dtype=np.int64)
    g = _ids(group, n)
    if g.dtype.kind in "iuf" and n > 1 and bool(np.all(g[1:] >= g[:-1])):
        # already prompt-major (the engine's layout): codes by counting changes, no sort
        new = np.concatenate(([True], g[1:] != g[:-1]))
        return np.cumsum(new) - 1, g[new]
    try:
        labels, codes = np.unique(g, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"group: expected sortable prompt ids (ints or strings), got dtype {g.dtype}.") from e
    return codes.reshape(-1).astype(np.int64), labels


def prompt_groups(group, n: int) -> Groups:
    """The prompt groups of a ``group`` array of length n (None: one prompt), ids checked as in
    :func:`group_codes`. Numeric ids that already come prompt-major (the engine's layout) are
    grouped where they change, without the [N] codes: ``make_groups(*group_codes(group, n))``."""
    if group is not None and n > 1:
        g = _ids(group, n)
        if g.dtype.kind in "iuf":
            starts = np.concatenate(([0], np.flatnonzero(g[1:] != g[:-1]) + 1))  # [P] where the id changes
            # constant between changes: sorted exactly when the ids at the changes increase
            if bool(np.all(g[starts[1:]] > g[starts[:-1]])):
                return Groups(labels=g[starts], order=None, sizes=np.diff(starts, append=n), starts=starts)
    return make_groups(*group_codes(group, n))


def _ids(group, n: int) -> np.ndarray:
    """``group`` as an array of n prompt ids: no nan, no float with a fraction."""
    g = np.asarray(group)
    if g.shape != (n,):
        raise ValueError(
            f"group: expected shape {_shape_str((n,))} (one prompt id per row, like log_p0), got "
            f"{_shape_str(g.shape)}; for a [P, G] layout pass 2-D arrays and group=None."
        )
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise ValueError("group: expected a prompt id for every row, got nan ids.")
    if g.dtype.kind == "f" and not np.all(g == np.round(g)):
        i = int(np.flatnonzero(g != np.round(g))[0])
        raise ValueError(
            f"group: expected prompt ids (integers or strings), got floats with a fractional part "
            f"({g[i]:.6g} at row {i}): log-probs, lengths or entropies in group's place? {ORDER}."
        )
    return g


def check_group_sizes(groups: Groups) -> None:
    """Every prompt needs ≥ 2 rows: one row has no within-prompt variance and w̄ = 1."""
    small = groups.sizes < 2
    if small.any():
        ids = groups.labels[small][:5].tolist()
        # most prompts with one row: `group` probably holds another per-row array
        hint = f" If `group` holds something else (lengths?), {ORDER}." if small.mean() > 0.5 else ""
        raise ValueError(
            f"group: expected at least 2 rows per prompt, got {int(small.sum())} prompt(s) with "
            f"one row (ids {ids}{' ...' if small.sum() > 5 else ''}); sample G ≥ 2 completions "
            f"per prompt or drop those rows.{hint}"
        )


def layout(log_p0, group, name: str = "log_p0") -> tuple[tuple[int, ...], np.ndarray, Groups]:
    """Shape of the inputs, ``log_p0`` as [N], and the prompt groups ([P, G] or 1-D + group)."""
    s0 = as_rows(name, log_p0)
    shape = np.shape(log_p0)
    if len(shape) == 2:
        if group is not None:
            raise ValueError(
                f"group: expected None with 2-D inputs of shape {_shape_str(shape)} (row p is "
                "prompt p), got an array; pass 1-D arrays [N] to group rows yourself."
            )
        n_prompts, g = shape
        starts = np.arange(n_prompts) * g  # row p is prompt p
        groups = Groups(labels=np.arange(n_prompts), order=None, sizes=np.full(n_prompts, g), starts=starts)
    else:
        groups = prompt_groups(group, s0.size)
    check_group_sizes(groups)
    return shape, s0, groups


def _entropy_sums(entropy_sum0, entropy_sum1, shape) -> tuple[np.ndarray | None, ...]:
    if (entropy_sum0 is None) != (entropy_sum1 is None):
        raise ValueError(
            "entropy_sum0, entropy_sum1: expected both (Rao–Blackwellised estimates need the "
            "next-token entropies under p0 and p1) or neither, got only one."
        )
    if entropy_sum0 is None:
        return None, None
    out = []
    for name, x in (("entropy_sum0", entropy_sum0), ("entropy_sum1", entropy_sum1)):
        arr = as_rows(name, x, shape)
        check_finite(name, arr)
        if arr.min() < -LOGP_TOL:
            raise ValueError(f"{name}: expected sums of entropies (≥ 0), got a minimum of {arr.min():.4g}.")
        out.append(arr)
    return tuple(out)


def _stopped(stopped, shape) -> np.ndarray | None:
    if stopped is None:
        return None
    if isinstance(stopped, (str, bytes)):
        raise TypeError(f"stopped: expected an array of booleans like log_p0, got {type(stopped).__name__}.")
    arr = np.asarray(stopped)
    if arr.shape != shape:
        raise ValueError(
            f"stopped: expected shape {_shape_str(shape)} like log_p0 (True where the row ends "
            f"with a stop token), got {_shape_str(arr.shape)}."
        )
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"stopped: expected booleans (or 0/1), got dtype {arr.dtype}.")
        arr = arr.astype(bool)
    return arr.reshape(-1)


def _eos_term(name: str, x, shape, stopped: np.ndarray, upper: float | None) -> np.ndarray:
    """Per-row stop-token term, zero where ``stopped`` is False (those entries are ignored)."""
    arr = as_rows(name, x, shape)
    check_finite(name, arr[stopped], "(only rows with stopped=True are checked and used)")
    if upper is not None and stopped.any() and arr[stopped].max() > upper:
        raise ValueError(f"{name}: expected log-probabilities (≤ 0), got {arr[stopped].max():.4g}.")
    return np.where(stopped, arr, 0.0)


def _stop_entropy(name: str, eos: dict, ent: np.ndarray, shape) -> np.ndarray:
    """Σ_t −p_stop log p_stop along each row (every row: STOP could follow any prefix)."""
    arr = as_rows(name, eos[name], shape)
    check_finite(name, arr)
    if arr.min() < -LOGP_TOL or (arr - ent).max() > LOGP_TOL:
        raise ValueError(
            f"{name}: expected the stop tokens' share of the entropy sum, between 0 and "
            f"entropy_sum{name[-1]} on every row, got values in [{arr.min():.4g}, {arr.max():.4g}]."
        )
    return arr


def _exclude_eos(
    s: list[np.ndarray], length: np.ndarray, ent: list, stopped, eos: dict, shape
) -> tuple[list[np.ndarray], np.ndarray, list]:
    """Subtract the stop position from S0, S1, L (and the entropy sums): ``include='no_eos'``."""
    missing = [k for k in ("eos_logp0", "eos_logp1") if eos[k] is None]
    if stopped is None:
        missing.insert(0, "stopped")
    if ent[0] is not None:
        missing += [k for k in ("eos_entropy_sum0", "eos_entropy_sum1") if eos[k] is None]
    if missing:
        raise ValueError(
            f"include: 'no_eos' needs {', '.join(missing)} (shape {_shape_str(shape)}): which "
            "rows end with a stop token, that token's log-prob under each model and, with "
            "entropy sums, the stop tokens' share of them; got None."
        )
    if (length[stopped] < 1).any():
        rows = np.flatnonzero(stopped & (length < 1))[:5].tolist()
        raise ValueError(
            f"length: rows with stopped=True must count their stop token (L ≥ 1), got L = 0 at "
            f"rows {rows}; pass lengths computed with the EOS included."
        )
    for k in (0, 1):
        s[k] = s[k] - _eos_term(f"eos_logp{k}", eos[f"eos_logp{k}"], shape, stopped, LOGP_TOL)
        if s[k].max() > LOGP_TOL:
            raise ValueError(
                f"eos_logp{k}: the stop token's log-prob is below the row's total log_p{k} "
                "(it must be one of the summed terms); check that log_p includes the EOS."
            )
        if ent[k] is not None:
            ent[k] = ent[k] - _stop_entropy(f"eos_entropy_sum{k}", eos, ent[k], shape)
    return s, length - stopped, ent


def prepare(
    log_p0,
    log_p1,
    length,
    group,
    *,
    entropy_sum0=None,
    entropy_sum1=None,
    include: str = "all",
    stopped=None,
    eos: dict | None = None,
    log_q=None,
) -> Rows:
    """Validate and flatten the estimator inputs into :class:`Rows` (prompt-sorted order)."""
    shape, s0, groups = layout(log_p0, group)
    s1 = as_rows("log_p1", log_p1, shape)
    _check_logp("log_p0", s0)
    _check_logp("log_p1", s1)
    length, counted = _length(length, shape)
    lq = None if log_q is None else _log_q(log_q, shape)
    ent = list(_entropy_sums(entropy_sum0, entropy_sum1, shape))
    stop = _stopped(stopped, shape)
    eos = eos or {}
    fingerprint = RowsFingerprint.of(groups, counted, s0)  # before no_eos: whole rows, as per decision
    log_r = s1 - s0  # full sequences, EOS included: this is what the proposal p0 sampled
    s = [s0, s1]
    if include == "no_eos":
        s, length, ent = _exclude_eos(s, length, ent, stop, eos, shape)
    elif any(v is not None for v in eos.values()):
        given = [k for k, v in eos.items() if v is not None]
        raise ValueError(f"{', '.join(given)}: only used with include='no_eos', got include={include!r}.")
    _check_empty_rows(fingerprint.length, s0, s1)  # after no_eos's own, more specific, check of L = 0
    sort = groups.sort
    delta = None
    if include == "no_eos":
        delta = s[1] - s[0]
        delta = sort(delta) if np.any(delta != log_r) else None
    return Rows(
        groups=groups,
        log_r=sort(log_r),
        s0=sort(s[0]),
        s1=sort(s[1]),
        length=sort(length),
        ent0=None if ent[0] is None else sort(ent[0]),
        ent1=None if ent[1] is None else sort(ent[1]),
        stopped=None if stop is None else sort(stop),
        # full sequences, EOS included, like log_r: q sampled every token
        log_r0q=None if lq is None else sort(s0 - lq),
        log_r1q=None if lq is None else sort(s1 - lq),
        fingerprint=fingerprint,
        delta=delta,
    )


def _check_empty_rows(length: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> None:
    """A row with L = 0 counts no token, so its log-probs (sums over no tokens) are 0."""
    empty = length == 0
    if not empty.any():
        return
    bad = empty & ((np.abs(s0) > LOGP_TOL) | (np.abs(s1) > LOGP_TOL))
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"length: rows {rows} count 0 tokens, but their log-probs are not 0 (log_p0 {s0[rows[0]]:.4g} at "
            f"row {rows[0]}; a sum over no tokens is 0): lengths must count the same tokens as log_p0 and "
            f"log_p1, stop token included; prompt ids in length's place? {ORDER}."
        )


def _length(length, shape) -> tuple[np.ndarray, np.ndarray]:
    """Counted tokens per row, [N]: finite whole numbers ≥ 0, as float64 and as int64."""
    arr = as_rows("length", length, shape)
    check_finite("length", arr)
    if arr.min() < 0:
        rows = np.flatnonzero(arr < 0)[:5].tolist()
        raise ValueError(
            f"length: expected counted tokens per row (≥ 0), got negative values at rows {rows}; "
            f"log-probs in its place? {ORDER}."
        )
    counted = arr.astype(np.int64)  # whole numbers are those the cast leaves unchanged (below 2^63)
    frac = counted != arr
    if frac.any() and (frac := arr != np.round(arr)).any():  # (round decides past 2^63)
        rows = np.flatnonzero(frac)[:5].tolist()
        raise ValueError(
            f"length: expected counted tokens per row (whole numbers), got fractional values at rows {rows} "
            f"(e.g. {arr[rows[0]]:.6g}); entropy sums in its place? {ORDER}."
        )
    return arr, counted
