"""Audit of a trainer's per-token log-probs: their values, and the logits column they came from.

The reference is the naive one of the engine's tests (DESIGN.md §2): each row unpadded, one
forward with positions 0..t-1, the token at completion column c scored by the logits of input
column prompt_len + c - 1. The two wrong columns a trainer can slice are scored in the same pass::

    column (unpadded)   0   1   2 |  3   4   5
    token              p0  p1  p2 | c0  c1  c2          prompt_len = 3, c1 is completion column 1
    c1 scored by the hidden state of
      aligned      column 3 = prompt_len + c - 1        logits[:, P - 1 : -1] of a padded batch
      own column   column 4 = prompt_len + c            logits[:, -C:], the usual slip
      two back     column 2 = prompt_len + c - 2

Only log p of the three candidate targets is kept per hidden state; the LM head runs on chunks
of hidden states upcast to fp32, so no [N, T, V] logits exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from isdelta.engine.audit_checks import Reference, cells_finding
from isdelta.engine.audit_report import Finding, Kind
from isdelta.engine.split import SplitLM
from isdelta.engine.transform import LogitTransform

__all__ = [
    "check_logits_alignment",
    "check_logp_values",
    "check_logps",
    "hidden_states",
    "logps_from_logits",
    "row_references",
    "scoring",
]

HEAD_CHUNK = 256  # hidden states per LM-head call: 256 × V fp32 logits at a time
SHIFT_MARGIN = 1.0  # nats per token by which a neighbour column must fit better (logits-only test)
# hypothesis -> k: the hidden state at unpadded index j scores the token at index j + k
_COLUMNS = {"aligned": 1, "own column": 0, "two back": 2}


@contextmanager
def scoring(model: torch.nn.Module) -> Iterator[SplitLM]:
    """The model split into body and head, in eval mode without a graph; the mode is restored."""
    lm = SplitLM.of(model)
    was_training = lm.model.training
    lm.model.eval()  # dropout off: the reference must be a function of the weights
    try:
        with torch.no_grad():
            yield lm
    finally:
        lm.model.train(was_training)


def hidden_states(lm: SplitLM, ids: torch.Tensor, att: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Body hidden states [n, T, D]; ``pos=None`` calls the body without position_ids (its default)."""
    kw = {} if pos is None else {"position_ids": pos.to(lm.device)}
    out = lm.body(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device), use_cache=False, **kw)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def check_logp_values(ref: Reference, logps: torch.Tensor) -> list[Finding]:
    """Per-token log-probs [N, C] must be finite and ≤ 0 at the counted tokens."""
    bad = ref.mask & (~torch.isfinite(logps) | (logps > 1e-4))
    return cells_finding(
        Kind.LOGP_INVALID,
        bad,
        ref,
        f"counted tokens carry log-probs that are not finite or are > 0 (e.g. {logps[bad][:4].tolist()}): "
        "these are not log-probabilities.",
        "Pass log_softmax(logits / temperature) gathered at completion_ids (not logits or probabilities).",
    )


def row_references(model: torch.nn.Module, ref: Reference, transform: LogitTransform) -> dict[str, torch.Tensor]:
    """Reference per-token log-probs [N, C] (float32, NaN where undefined) under each column hypothesis.

    ``"aligned"`` is the convention of DESIGN.md §2; ``"own column"`` and ``"two back"`` score token c
    with the logits of input column prompt_len + c and prompt_len + c - 2.
    """
    N, C = ref.completion_ids.shape
    out = {name: torch.full((N, C), float("nan")) for name in _COLUMNS}
    with scoring(model) as lm:
        for r in range(N):
            L, prompt = int(ref.lengths[r]), ref.prompt_ids[r][ref.prompt_mask[r].bool()]
            p = len(prompt)
            if L == 0 or p == 0:
                continue
            seq = torch.cat([prompt, ref.completion_ids[r, :L]])  # [t]: the row without pads
            t = len(seq)
            hs = hidden_states(lm, seq[None], torch.ones(1, t, dtype=torch.long), torch.arange(t)[None])[0]  # [t, D]
            for s in range(max(p - 2, 0), t, HEAD_CHUNK):
                logp = torch.log_softmax(transform(lm.logits(hs[s : s + HEAD_CHUNK])), -1).cpu()  # [m, V]
                j = torch.arange(s, s + logp.shape[0])  # [m] unpadded index of each hidden state
                for name, k in _COLUMNS.items():
                    c = j + k - p  # [m] completion column of the token this hidden state would score
                    ok = (c >= 0) & (c < L)
                    out[name][r, c[ok]] = logp[ok].gather(-1, seq[j[ok] + k][:, None])[:, 0]
                del logp  # [m, V]: free before the next chunk
    return out


def _shifted(x: torch.Tensor, k: int) -> torch.Tensor:
    """``y[:, c] = x[:, c + k]`` with NaN where c + k is outside the row ([N, C])."""
    y = torch.full_like(x, float("nan"))
    if k > 0:
        y[:, :-k] = x[:, k:]
    else:
        y[:, -k:] = x[:, :k]
    return y


def check_logps(ref: Reference, logps: torch.Tensor, refs: dict[str, torch.Tensor], tol: float) -> list[Finding]:
    """The user's per-token log-probs [N, C] against the reference at the counted tokens: a one-column
    shift when a wrong column fits within ``tol`` nats, else a plain disagreement."""
    logps = logps.float()
    m = ref.mask & torch.isfinite(refs["aligned"])  # [N, C]
    err = torch.where(m, (logps - refs["aligned"]).abs().nan_to_num(torch.inf), 0.0)  # [N, C]
    if not m.any() or float(err.max()) <= tol:
        return []
    seq = torch.where(m, logps - refs["aligned"], 0.0).double().sum(-1).abs()  # [N] nats per sequence
    rows = (err > tol).any(-1).nonzero().flatten().tolist()
    cols = tuple((err > tol).any(0).nonzero().flatten().tolist())
    size = (
        f"Sequence log-probs are off by {float(seq[rows].mean()):.3g} nats on average over these rows, "
        f"{float(seq.max()):.3g} at most (per token up to {float(err.max()):.3g})."
    )
    candidates = {
        "own column": (refs["own column"], "the logits of input column prompt_len + c, the token's own column"),
        "two back": (refs["two back"], "the logits of input column prompt_len + c - 2"),
        "one ahead": (_shifted(refs["aligned"], 1), "the right logits, but stored one column early (token c + 1's)"),
        "one behind": (_shifted(refs["aligned"], -1), "the right logits, but stored one column late (token c - 1's)"),
    }
    fits = {}
    for name, (cand, _) in candidates.items():
        ok = m & torch.isfinite(cand)
        if ok.sum() >= max(1, int(m.sum()) // 2):
            fits[name] = float((logps - cand).abs()[ok].max())
    best = min(fits, key=fits.get, default=None)
    if best is not None and fits[best] <= tol:
        detail = (
            f"per_token_logps[:, c] are log p(token c) under {candidates[best][1]} (they match it to "
            f"{fits[best]:.2g} nats), not under the logits of input column prompt_len + c - 1. {size}"
        )
        fix = (
            "Score completion column c with the logits of input column prompt_len + c - 1: "
            "logits[:, prompt_len - 1 : -1] (or logits[:, -C - 1 : -1]), then log_softmax and gather "
            "completion_ids; keep the array aligned with completion_ids."
        )
        return [Finding(Kind.LOGP_SHIFTED, tuple(rows), cols, detail, fix, nats=float(seq.max()))]
    detail = f"per_token_logps disagree with the model's reference beyond {tol:g} nats per token; no one-column shift explains them. {size}"
    fix = (
        "Score with the sampler's temperature (AuditOptions.temperature), the same weights (not a stale copy), "
        "explicit position ids and an fp32 log_softmax; raise AuditOptions.logp_tol for a bf16 trainer."
    )
    return [Finding(Kind.LOGP_MISMATCH, tuple(rows), cols, detail, fix, nats=float(seq.max()))]


def logps_from_logits(logits: torch.Tensor, completion_ids: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """Per-token log-probs [N, C] of completion_ids under a trainer's logits [N, C, V], one row at a time."""
    return torch.stack(
        [
            torch.log_softmax(transform(logits[r].float()), -1).gather(-1, completion_ids[r, :, None])[:, 0]
            for r in range(logits.shape[0])
        ]
    )


def check_logits_alignment(ref: Reference, logits: torch.Tensor, transform: LogitTransform) -> list[Finding]:
    """Without a model: do the trainer's logits [N, C, V] fit the neighbouring tokens better than their own?

    Logits taken one column late predict token c + 1; for completions sampled from (or likely
    under) that model, log p(token c + 1) under them then beats log p(token c) by far more than
    ``SHIFT_MARGIN`` nats per token. An aligned batch shows no such gain; the test needs likely
    tokens, and the model check (``model=``) is exact.
    """
    ids, m = ref.completion_ids, ref.mask  # [N, C]
    own = logps_from_logits(logits, ids, transform)  # [N, C]
    nxt, prv = torch.full_like(own, float("nan")), torch.full_like(own, float("nan"))
    for r in range(ids.shape[0]):
        logp = torch.log_softmax(transform(logits[r].float()), -1)  # [C, V]
        nxt[r, :-1] = logp[:-1].gather(-1, ids[r, 1:, None])[:, 0]  # logits c scoring token c + 1
        prv[r, 1:] = logp[1:].gather(-1, ids[r, :-1, None])[:, 0]  # logits c scoring token c - 1
    nb_next, nb_prev = torch.zeros_like(m), torch.zeros_like(m)  # [N, C]: the neighbour is counted too
    nb_next[:, :-1], nb_prev[:, 1:] = m[:, 1:], m[:, :-1]
    checks = (
        (nxt, nb_next, "one column late (input column prompt_len + c, the token's own): they fit token c + 1"),
        (prv, nb_prev, "one column early (prompt_len + c - 2): they fit token c - 1"),
    )
    for alt, neighbour, what in checks:
        ok = m & neighbour & torch.isfinite(alt) & torch.isfinite(own)
        if not ok.any():
            continue
        gain = float((alt - own)[ok].mean())
        if gain > SHIFT_MARGIN:
            row_gain = torch.where(ok, alt - own, 0.0).sum(-1) / ok.sum(-1).clamp(min=1)  # [N]
            rows = (row_gain > SHIFT_MARGIN).nonzero().flatten().tolist() or ok.any(-1).nonzero().flatten().tolist()
            detail = (
                f"the logits look taken {what} better than their own token by {gain:.3g} nats per token on "
                "average (inferred from the logits alone, assuming the tokens are likely under the model that "
                "made them; pass model= for an exact check)."
            )
            fix = "Take the logits of input column prompt_len + c - 1 for completion column c: logits[:, prompt_len - 1 : -1]."
            return [Finding(Kind.LOGP_SHIFTED, tuple(rows), (), detail, fix, block="row")]
    return []
