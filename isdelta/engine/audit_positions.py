"""Audit of the positions a trainer's forward uses, and what wrong ones cost in nats on a model.

The convention (DESIGN.md §2): ``position_ids = clamp(cumsum(attention_mask) - 1, min=0)``, passed
explicitly. A forward without them gets the model's default ``arange(T)`` (HF models without a
cache), so a row with k left pads starts at position k instead of 0: an absolute-position model
(GPT-2) scores it wrongly; a RoPE model sees a shift common to the whole row, which its attention
scores cancel up to rounding. Only the positions of real tokens are compared (a pad's position
changes no real token's score).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isdelta.engine.audit_checks import Reference, as_tensor
from isdelta.engine.audit_logps import HEAD_CHUNK, hidden_states, scoring
from isdelta.engine.audit_report import Finding, Kind
from isdelta.engine.masking import position_ids as _position_ids
from isdelta.engine.split import SplitLM

__all__ = ["audit_positions", "check_positions", "implicit_positions", "position_error"]


def audit_positions(
    ref: Reference, positions, attention=None, model: torch.nn.Module | None = None, rows_per_forward: int = 8
) -> list[Finding]:
    """:func:`check_positions`, with the nats per sequence the positions cost on ``model`` when given."""
    if isinstance(positions, str) and positions != "implicit":
        raise ValueError(f"position_ids must be a tensor or 'implicit'; got {positions!r}.")
    found = check_positions(ref, positions, attention)
    if not found or model is None:
        return [replace(f, detail=f.detail + " Pass model= to measure what it costs.") for f in found]
    att = ref.attention if attention is None else as_tensor("attention_mask", attention, 2).long()
    given = positions if isinstance(positions, str) else as_tensor("position_ids", positions, 2)
    err = position_error(model, ref, given, att, rows_per_forward)  # [N]
    f = found[0]
    rows = list(f.rows)
    detail = (
        f"{f.detail} On the model given ({type(model).__name__}), these positions change the rows' sequence "
        f"log-probs by {float(err[rows].mean()):.3g} nats on average, {float(err[rows].max()):.3g} at most."
    )
    return [replace(f, detail=detail, nats=float(err[rows].max()))]


def check_positions(ref: Reference, positions, attention=None) -> list[Finding]:
    """Positions [N, P + C] (or ``"implicit"``: the model's default ``arange(T)``) against
    ``clamp(cumsum(attention) - 1, min=0)`` at the real tokens."""
    att = ref.attention if attention is None else as_tensor("attention_mask", attention, 2, binary=True).long()
    N, T = att.shape
    got = implicit_positions(N, T) if isinstance(positions, str) else as_tensor("position_ids", positions, 2)
    if got.shape[-1] != T or got.shape[0] not in (1, N):
        raise ValueError(f"position_ids must be [N, P + C] = [{N}, {T}] (or [1, {T}]); got {tuple(got.shape)}.")
    got = got.long().expand(N, T)
    want = _position_ids(att)  # [N, T]
    bad = (got != want) & att.bool()  # [N, T]: only real tokens' positions matter
    if not bad.any():
        return []
    rows = bad.any(-1).nonzero().flatten().tolist()
    r = rows[0]
    real = att[r].bool()
    g, w = got[r, real].tolist(), want[r, real].tolist()
    n_left = int((att[r].cumsum(-1) == 0).sum())  # left pads of row r
    why = (
        f" Row {r}'s positions are {n_left} too large, its number of left pads: the positions count the pads "
        "(what arange(T) gives, the model's default when position_ids are not passed)."
        if n_left and all(a - b == n_left for a, b in zip(g, w))
        else ""
    )
    return [
        Finding(
            Kind.POSITIONS,
            tuple(rows),
            tuple(bad.any(0).nonzero().flatten().tolist()),
            f"row {r}: positions {_short(g)} at its real tokens, expected {_short(w)}.{why} An absolute-position "
            "model (GPT-2) scores such rows wrongly; a RoPE model sees only a shift common to the row.",
            "Pass position_ids = isdelta.engine.position_ids(attention_mask) (clamp(cumsum(mask) - 1, min=0)) to "
            "every forward.",
            block="input",
        )
    ]


def _short(values: list[int], n: int = 6) -> str:
    return "[" + ", ".join(map(str, values[:n])) + (", …]" if len(values) > n else "]")


def implicit_positions(N: int, T: int) -> torch.Tensor:
    """What HF models use when no position_ids are passed (no cache): ``arange(T)`` for every row."""
    return torch.arange(T)[None, :].expand(N, T)


def position_error(
    model: torch.nn.Module, ref: Reference, positions, attention: torch.Tensor, rows_per_forward: int
) -> torch.Tensor:
    """|S(given positions) - S(cumsum(mask) - 1)| per row [N] (float64 nats): the padded batch scored
    twice, once as the trainer does (``positions="implicit"``: no position_ids passed)."""
    N, T = attention.shape
    ids, want = ref.input_ids, _position_ids(attention)  # [N, T]
    if not isinstance(positions, str):
        positions = positions.long().expand(N, T)
    diff = torch.zeros(N, dtype=torch.float64)
    with scoring(model) as lm:
        for s in range(0, N, rows_per_forward):
            rows = slice(s, s + rows_per_forward)
            given = None if isinstance(positions, str) else positions[rows]
            a = _padded_logps(lm, ids[rows], attention[rows], given, ref.mask[rows])
            b = _padded_logps(lm, ids[rows], attention[rows], want[rows], ref.mask[rows])
            diff[rows] = (a - b).double().sum(-1).abs()
    return diff


def _padded_logps(lm: SplitLM, ids, att, pos, mask) -> torch.Tensor:
    """Token log-probs [n, C] (0 where not counted) of the padded batch; column c scored by P + c - 1."""
    n, C = mask.shape
    P = ids.shape[1] - C
    hs = hidden_states(lm, ids, att, pos)[:, P - 1 : P - 1 + C]  # [n, C, D]
    r, c = mask.nonzero(as_tuple=True)  # [M]
    h, targets = hs[r.to(lm.device), c.to(lm.device)], ids[:, P:][r, c]  # [M, D], [M]
    out = torch.zeros(n, C)
    for s in range(0, len(r), HEAD_CHUNK):
        logp = torch.log_softmax(lm.logits(h[s : s + HEAD_CHUNK]), -1).cpu()  # [m, V], temperature 1
        out[r[s : s + HEAD_CHUNK], c[s : s + HEAD_CHUNK]] = logp.gather(-1, targets[s : s + HEAD_CHUNK, None])[:, 0]
    return out
