"""Per-position statistics of two models' next-token distributions, in the engine's batched pass.

For every selected position both models' fp32 logits [m, V] are formed for a chunk of m positions
at a time (the body runs once per micro-batch and model, the LM head only on selected positions,
as in :class:`~isdelta.engine.LogProbEngine`), and reduced on two *views*:

- ``full``: the model's own distribution, softmax(logits);
- ``trunc``: the sampling distribution, softmax(transform(logits)) (temperature → top-k → top-p,
  HF's order, −inf outside the kept set; :class:`~isdelta.engine.LogitTransform`).

Per view and model: entropy, varentropy, chosen-token p, top-1 p, the top-k probabilities, the
nucleus size (tokens needed to reach ``top_p`` mass, the top token always counted), the tail
mass beyond the top ``tail_k`` tokens, and B's probability of A's top-1 token; between the models
KL(a‖b) and KL(b‖a). In the ``trunc`` view a KL is +inf where one model keeps a token the other
drops; that is reported as inf, never NaN.

Naive equivalent of one position (the tests compare the two)::

    p = softmax(logits.double()); ps, ids = p.sort(descending=True)
    entropy = -(p * p.log()).sum();  top_k = ids[:k], ps[:k];  tail = ps[tail_k:].sum()
    nucleus = 1 + #{i : ps[:i+1].sum() < top_p};  KL(a‖b) = (p_a * (p_a.log() - p_b.log())).sum()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.split import SplitLM

if TYPE_CHECKING:
    from isdelta.tokens.options import TokenOptions

__all__ = ["collect_stats", "position_stats"]

# [m, V] buffers alive at once in position_stats (logits, log-probs, probs and temporaries of
# both models): a chunk holds chunk_elems / V / _LIVE positions.
_LIVE = 8
# tokens ranked per position by torch.topk; the nucleus needs a full sort only where these do not
# reach top_p (diffuse positions), which is ~10x slower per row than a top-128 on CPU
_SEARCH_K = 128


# ---------------------------------------------------------------------------- one chunk
def _nucleus(p: torch.Tensor, top: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens needed to reach ``top_p`` mass [m], from probs [m, V] and their largest K [m, K]
    in descending order; rows whose top K fall short are sorted in full."""
    cum = top.cumsum(-1)  # [m, K]
    n = (cum < top_p).sum(-1) + 1  # the first index whose cumulative mass reaches top_p
    short = cum[:, -1] < top_p
    if short.any():
        ps = torch.sort(p[short], dim=-1, descending=True).values  # [s, V]
        n[short] = ((ps.cumsum(-1) < top_p).sum(-1) + 1).minimum((ps > 0).sum(-1))
    return n


def _view(
    logp: torch.Tensor, targets: torch.Tensor, opts: TokenOptions, finite: bool, top_id: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Statistics [m] / [m, top_k] of one distribution given by log-probs [m, V]; also its probs
    [m, V] and the ids [m, K] of its K most likely tokens, in order.

    ``finite``: no log-prob is −inf (no truncation), so no masking is needed. ``top_id`` (from the
    full view) is reused for the truncated one: the transform is monotone in the logits, so the
    ranking is the same.
    """
    p = logp.exp()  # [m, V]
    safe = logp if finite else torch.where(p > 0, logp, torch.zeros_like(logp))  # 0·(−inf) is NaN
    entropy = -torch.einsum("mv,mv->m", p, safe)
    varentropy = torch.einsum("mv,mv->m", p, (safe + entropy[:, None]).square_())  # centred
    del safe
    if top_id is None:
        K = min(p.shape[-1], max(opts.top_k, opts.tail_k, 2, _SEARCH_K))
        top, top_id = torch.topk(p, K, dim=-1)  # [m, K]
    else:
        top = p.gather(-1, top_id)  # [m, K]
    mass = top[:, : opts.tail_k].double().sum(-1)
    out = {
        "entropy": entropy,
        "varentropy": varentropy,
        "chosen_p": p.gather(-1, targets[:, None]).squeeze(-1),
        "top1_p": top[:, 0],
        "top2_p": top[:, 1] if top.shape[1] > 1 else torch.zeros_like(entropy),
        "topk_p": top[:, : opts.top_k],
        "nucleus": _nucleus(p, top, opts.top_p),
        "tail": (1.0 - mass).clamp(min=0).float(),
    }  # ~1e-7 absolute: softmax sums to 1 ± that
    return out, p, top_id


def _kl(p_a: torch.Tensor, logp_a: torch.Tensor, logp_b: torch.Tensor, finite: bool) -> torch.Tensor:
    """KL(a‖b) [m] from probs and log-probs [m, V]; +inf where a has mass b lacks."""
    if finite:
        return torch.einsum("mv,mv->m", p_a, logp_a - logp_b)
    terms = torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a))  # 0 where p_a = 0
    return terms.sum(-1)


def _pair(logp_a, logp_b, targets, opts, finite: bool, top_a=None, top_b=None):
    """Both models' view statistics and the KLs, keyed ``a_*``, ``b_*``, ``kl_ab``, ``kl_ba``;
    and the top-K ids of each model."""
    a, p_a, top_a = _view(logp_a, targets, opts, finite, top_a)
    b, p_b, top_b = _view(logp_b, targets, opts, finite, top_b)
    out = {**{f"a_{k}": v for k, v in a.items()}, **{f"b_{k}": v for k, v in b.items()}}
    out["b_p_a_top1"] = p_b.gather(-1, top_a[:, :1]).squeeze(-1)  # B's p of A's top-1 token
    out["kl_ab"], out["kl_ba"] = _kl(p_a, logp_a, logp_b, finite), _kl(p_b, logp_b, logp_a, finite)
    return out, top_a, top_b


def position_stats(
    logits_a: torch.Tensor, logits_b: torch.Tensor, targets: torch.Tensor, opts: TokenOptions
) -> dict[str, torch.Tensor]:
    """Every per-position statistic of one chunk, on both views.

    Parameters
    ----------
    logits_a, logits_b : float32 [m, V]  the two models' logits at the same positions.
    targets : long [m]  the chosen (sampled or reference) token at each position.
    opts : TokenOptions  ``top_k``, ``top_p``, ``tail_k`` and the sampling ``transform``.

    Returns
    -------
    dict of tensors [m] (``[m, top_k]`` for ``*_topk_p``, ``a_topk_id``, ``b_topk_id``): full-view
    keys as named, truncated-view keys with the suffix ``_trunc``.
    """
    full, top_a, top_b = _pair(
        torch.log_softmax(logits_a, -1), torch.log_softmax(logits_b, -1), targets, opts, finite=True
    )
    full["a_topk_id"], full["b_topk_id"] = top_a[:, : opts.top_k], top_b[:, : opts.top_k]
    t = opts.transform
    if t.is_identity:  # the sampling distribution is the model's: nothing more to compute
        trunc = {k: v for k, v in full.items() if not k.endswith("_id")}
    else:
        trunc, _, _ = _pair(
            torch.log_softmax(t(logits_a), -1),
            torch.log_softmax(t(logits_b), -1),
            targets,
            opts,
            not t.truncates,
            top_a,
            top_b,
        )
    return {**full, **{f"{k}_trunc": v for k, v in trunc.items()}}


# ---------------------------------------------------------------------------- the pass
def _forward_mask(counted: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Counted positions up to each row's last selected one [N, C] (a prefix mask: the body
    never runs past the last position a row needs)."""
    C = counted.shape[1]
    col = torch.arange(C, device=counted.device)
    last = torch.where(select, col, torch.full_like(col, -1)).max(-1).values  # [N]
    return counted & (col[None, :] <= last[:, None])


def _checked_models(model_a, model_b, rollouts: Rollouts, top_k: int) -> tuple[SplitLM, SplitLM]:
    """Both models split into body and head; the vocabularies must agree."""
    a, b = SplitLM.of(model_a), SplitLM.of(model_b)
    Va, Vb = a.vocab_size, b.vocab_size
    if Va != Vb:
        raise ValueError(
            f"model_a has {Va} output tokens and model_b {Vb}: token-level comparison "
            "needs one vocabulary (two checkpoints of one model, or one tokenizer)."
        )
    if top_k > Va:
        raise ValueError(f"top_k = {top_k} exceeds the vocabulary ({Va} tokens); pass top_k <= {Va}.")
    rollouts.check_vocab(Va)
    return a, b


def collect_stats(
    model_a, model_b, rollouts: Rollouts, select: torch.Tensor, opts: TokenOptions
) -> dict[str, np.ndarray]:
    """:func:`position_stats` at every selected position, plus ``rows`` and ``cols`` [M].

    Positions come out in the engine's micro-batch order (rows longest first); the caller sorts.
    ``select`` [N, C] must be a subset of ``rollouts.mask(opts.include_eos)``.
    """
    lm_a, lm_b = _checked_models(model_a, model_b, rollouts, opts.top_k)
    ma, mb = lm_a.model, lm_b.model
    counted = rollouts.mask(opts.include_eos)  # [N, C]
    select = select.to(counted.device) & counted
    fwd = _forward_mask(counted, select)
    engine = LogProbEngine(
        EngineConfig.from_transform(
            opts.transform, include_eos=opts.include_eos, token_budget=opts.token_budget, progress=False
        )
    )
    dev_a, dev_b = lm_a.device, lm_b.device
    step = max(1, opts.chunk_elems // lm_a.vocab_size // _LIVE)
    modes = (ma.training, mb.training)
    ma.eval(), mb.eval()
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(
        total=int(select.sum()),
        desc="token stats",
        unit="pos",
        leave=False,
        disable=True if not opts.progress else None,
    )
    try:
        with torch.no_grad():
            for lm in (lm_a, lm_b):
                engine.check_head(lm, rollouts, fwd)  # body + head == model(...).logits, once per model
            for rows in engine.micro_batches(rollouts, fwd):
                h_a, r_idx, cols = engine.hidden_states(lm_a, rollouts, fwd, rows)  # [M, D], [M], [M]
                h_b, _, _ = engine.hidden_states(lm_b, rollouts, fwd, rows)
                keep = select.to(dev_a)[r_idx, cols]  # [M] selected among the forward's positions
                h_a, h_b, r_idx, cols = h_a[keep], h_b[keep.to(dev_b)], r_idx[keep], cols[keep]
                targets = rollouts.completion_ids.to(dev_a)[r_idx, cols]  # [M]
                for s in range(0, len(targets), step):
                    la = lm_a.logits(h_a[s : s + step])  # [m, V]
                    lb = lm_b.logits(h_b[s : s + step]).to(dev_a)  # [m, V]
                    stats = position_stats(la, lb, targets[s : s + step], opts)
                    stats["rows"], stats["cols"] = r_idx[s : s + step], cols[s : s + step]
                    parts.append({k: v.cpu().numpy() for k, v in stats.items()})
                    bar.update(len(la))
                    del la, lb, stats
        if not parts:  # nothing selected: empty arrays with every key and the right rank
            empty = torch.zeros(0, lm_a.vocab_size, device=dev_a)
            stats = position_stats(empty, empty, torch.zeros(0, dtype=torch.long, device=dev_a), opts)
            stats["rows"] = stats["cols"] = torch.zeros(0, dtype=torch.long)
            parts.append({k: v.cpu().numpy() for k, v in stats.items()})
    finally:
        bar.close()
        ma.train(modes[0]), mb.train(modes[1])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
