"""Audit of the weight a trainer's loss gives each token: per token (``1 / Σ L``, DESIGN.md §7), per
sequence (``1 / (N·L_i)``: long completions down-weighted), all zero (the loss trains on nothing),
or neither (advantages folded in?)."""

from __future__ import annotations

import torch

from isdelta.engine.audit_checks import Reference
from isdelta.engine.audit_report import Finding, Kind, spans

__all__ = ["check_loss_weights"]


def check_loss_weights(ref: Reference, weights: torch.Tensor) -> tuple[list[Finding], list[str]]:
    """Per-token weights [N, C] against per-token normalisation (constant over the batch's counted
    tokens, ``1 / Σ L``) and per-sequence normalisation (``1 / (N·L_i)`` in row i)."""
    w = weights.double()
    use = ref.user_mask & ref.mask  # [N, C]: tokens both count
    has = use.any(-1)  # [N]
    if not has.any():
        return [], []
    if not bool((w[use] != 0).any()):
        rows = has.nonzero().flatten().tolist()
        detail = (
            f"every counted token of the batch has loss weight 0 (rows {spans(rows)}): the loss trains on nothing "
            "(an integer division such as mask // mask.sum() gives this, or weights taken from an empty mask)."
        )
        fix = "Weight each counted token 1 / Σ L in floating point: mask.float() / mask.sum() (DESIGN.md §7)."
        return [Finding(Kind.WEIGHTS_ZERO, tuple(rows), (), detail, fix, block="row")], []
    hi = torch.where(use, w, -torch.inf).max(-1).values  # [N]
    lo = torch.where(use, w, torch.inf).min(-1).values
    scale = float(w[use].abs().max()) or 1.0
    vary = has & ((hi - lo) > 1e-6 * scale)
    v, L = hi[has], ref.user_mask.sum(-1)[has].double()  # per-row weight, the trainer's own L_i
    if not vary.any() and float(v.max() - v.min()) <= 1e-6 * scale:
        notes = []
        if bool((L[0] == L).all()):
            notes.append("loss weights: every row has the same L, so per-token and per-sequence weights coincide.")
        return [], notes
    vL = v * L
    if not vary.any() and float(vL.max() - vL.min()) <= 1e-6 * float(vL.abs().max()):
        ratio = float(L.mean()) / L  # per-sequence weight / per-token weight of the same total
        rows = has.nonzero().flatten()[(ratio - 1).abs() > 1e-9].tolist()
        detail = (
            f"each row's tokens weigh 1/L_i (rows of L = {int(L.max())} down to {int(L.min())} tokens): every "
            f"sequence counts as much as any other, so a token of the longest completion weighs "
            f"{float(ratio.min()):.2g}× and of the shortest {float(ratio.max()):.2g}× what it would per token. "
            "Long completions are down-weighted: with a negative advantage, a long wrong answer is penalised less per token."
        )
        fix = "Divide the summed token losses by the batch's total counted tokens Σ L (DESIGN.md §7), not by each L_i."
        return [Finding(Kind.PER_SEQUENCE, tuple(rows), (), detail, fix, block="row")], []
    rows = (vary if vary.any() else has).nonzero().flatten().tolist()
    detail = (
        "the weights vary within rows or across rows in a way that is neither a constant per token nor 1/L_i per "
        f"row (rows {spans(rows)}). Pass the normalisation weights only, without advantages or clipping."
    )
    return [Finding(Kind.WEIGHTS_OTHER, tuple(rows), (), detail, "Normalise by Σ L (per token).", block="row")], []
