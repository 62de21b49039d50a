r"""Parameter-space first-order prediction ΔH₁ = ⟨∇θ H(θ0), θ1 − θ0⟩ (DESIGN.md §6).

Derivation (x ~ p0 within one prompt, S = log p_θ(x), D = ⟨∇θ S, d⟩ the directional derivative
of a row's log-prob along the direction d = θ1 − θ0):

    H(θ) = −Σ_x p_θ(x) log p_θ(x)
    ∇H   = −Σ_x ∇p·log p − Σ_x ∇p = −E[S ∇S]          (Σ ∇p = ∇1 = 0)
         = −E[(S − b) ∇S] = −Cov(S, ∇S)                (any b independent of x: E[∇S] = 0)
    ⟨∇H, d⟩ = −Cov(S, D).

With the leave-one-out baseline b_i = mean_{j∈p, j≠i} S_j, S_i − b_i = G_p/(G_p − 1)·(S_i − S̄_p),
so the probe loss of prompt p, ℓ_p = −(1/G_p) Σ_{i∈p} stopgrad(S_i − b_i)·S_i, has

    A_p = ⟨∇ℓ_p, d⟩ = −1/(G_p − 1) Σ_{i∈p} (S_i − S̄_p) D_i,

the unbiased (ddof = 1) sample covariance: E[A_p] = ⟨∇H_p, d⟩ exactly, and A_p is the function-
space ΔH₁_p = −Cov_p(S0, δ) of ``estimate`` with δ = S1 − S0 replaced by its first-order term
D (so ΔH₁(function space, α)/α → A as α → 0 on the same samples, a test). Prompts have equal
mass 1/P: ΔH₁ = (1/P) Σ_p A_p. DESIGN's ℓ_H = −(1/N) Σ_i … is this only when every G_p is
equal; with ragged G a per-row mean over-weights prompts with many samples (a test shows it).
The loss is a surrogate for +H: its gradient is ∇H, so ⟨∇ℓ, d⟩ > 0 predicts an entropy rise.

Entropy rate (per token, a ratio of means): h = H/Λ with Λ = (1/P) Σ_p E_p[L]. L does not
depend on θ for a fixed x, so ∇E_p[L] = Cov_p(L, ∇S), and

    ⟨∇h, d⟩ = (⟨∇H, d⟩ − h ⟨∇Λ, d⟩) / Λ = (1/(PΛ)) Σ_p (A_p + h B_p),
    B_p = −1/(G_p − 1) Σ_{i∈p} (L_i − L̄_p) D_i,

i.e. the same covariance with S replaced by f = S + hL = L·(S/L + h): "S/L" enters as the
per-token log-prob centred at the rate −h and weighted by L. Putting S/L itself in the probe
loss (−Cov(S/L, ∇S), or the gradient of S/L) differentiates the mean of per-row ratios
E[−S/L], a different estimand from the rate Σ E[−S]/Σ E[L] that ``estimate`` reports. h and Λ
are the plug-in estimates from the same rows (held fixed: O(1/N) bias).

Without the stop token (``include_eos=False``): S' = S − log p(stop)·1[stopped], L' = L −
1[stopped]. The sampling distribution still draws the stop token, so the score function stays
∇S while the measured function is S', which now depends on θ through log p(stop):
∇E[−S'] = −Cov(S', ∇S) + E[∇ log p(stop)·1[stopped]]. Hence A_p gains
+mean_{i∈p} 1[stopped_i]·⟨∇ log p(stop_i), d⟩, and S, L become S', L' in the covariances.

Memory and cost: the coefficients come from a no-grad pass (or the caller's ``scores0``); then
each prompt's rows are scored with a graph in micro-batches of at most ``token_budget`` tokens,
and ``torch.autograd.grad`` of each micro-batch's share gives a temporary gradient that is
dotted with d parameter by parameter and dropped. No ``.grad`` buffer is written (the model's
gradient state is untouched) and no flattened copy of the gradient or of d is made; the peak
holds one gradient's worth of memory. Micro-batches never mix prompts, so every A_p is known,
which gives the per-prompt values and a between-prompt standard error. ``per_token=True`` runs
a second backward per micro-batch (for B_p) on the same graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.scores import SequenceScores
from isdelta.estimators.results import Estimate
from isdelta.estimators.uncertainty import z_value
from isdelta.outputs import finite_or_none
from isdelta.probes.parameters import Direction, check_direction

__all__ = ["GradientDelta", "gradient_delta"]


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class GradientDelta:
    """⟨∇θ H(θ0), d⟩ estimated by the score-function probe loss (module docstring).

    Attributes
    ----------
    delta1 : Estimate
        Sequence-level ΔH₁ (nats per completion) = (1/P) Σ_p A_p, with the between-prompt SE
        sd_p(A_p)/√P (prompts treated as a sample; for a fixed prompt set it also counts the
        spread of the true per-prompt values, so it is conservative; nan when P < 2).
    delta1_tok : Estimate or None
        Entropy-rate ΔH₁ (nats per token) = (1/(PΛ)) Σ_p (A_p + h B_p), SE likewise with h and Λ
        held fixed; None unless ``per_token=True``.
    per_prompt : ndarray [P] float64
        A_p, the estimate of ⟨∇H_p, d⟩ for each prompt (order of ``prompts``).
    per_prompt_tok : ndarray [P] float64 or None
        (A_p + h B_p)/Λ, whose mean over prompts is ``delta1_tok``.
    prompts : ndarray [P]
        The prompt ids (sorted distinct values of ``rollouts.group``).
    h0, h0_tok, mean_length : float
        H(p0) per sequence, the rate h and Λ = E[L] estimated from the same rows (counted tokens).
    direction_norm : float
        ‖d‖₂ over the parameters of the direction.
    include : {"all", "no_eos"}
        Whether the stop token's position is counted.
    per_token : bool
        Which variant ``value`` reports.
    n_rows, n_prompts, n_backward : int
        Rows, prompts and backward passes run.
    """

    delta1: Estimate
    delta1_tok: Estimate | None
    per_prompt: np.ndarray
    per_prompt_tok: np.ndarray | None
    prompts: np.ndarray
    h0: float
    h0_tok: float
    mean_length: float
    direction_norm: float
    include: Literal["all", "no_eos"]
    per_token: bool
    n_rows: int
    n_prompts: int
    n_backward: int

    @property
    def value(self) -> float:
        """The requested variant's ΔH₁ (per token when ``per_token``, else per sequence)."""
        return (self.delta1_tok if self.per_token else self.delta1).value

    def to_dict(self) -> dict:
        """JSON-safe: Estimates as dicts (nats and bits), arrays as lists."""
        tok = self.per_prompt_tok
        return {
            "delta1": self.delta1.to_dict(),
            "delta1_tok": None if self.delta1_tok is None else self.delta1_tok.to_dict(),
            "per_prompt": _json(self.per_prompt),
            "per_prompt_tok": None if tok is None else _json(tok),
            "prompts": [int(p) for p in self.prompts],
            **{k: finite_or_none(getattr(self, k)) for k in ("h0", "h0_tok", "mean_length", "direction_norm")},
            "include": self.include,
            "per_token": self.per_token,
            "n_rows": self.n_rows,
            "n_prompts": self.n_prompts,
            "n_backward": self.n_backward,
            "se_kind": "between-prompt (sd_p / sqrt(P))",
        }


def _json(x: np.ndarray) -> list:
    return [finite_or_none(float(v)) for v in x]


# ---------------------------------------------------------------------------- p0 rows
ScoresLike = SequenceScores | Mapping[str, np.ndarray]
_KEYS = ("logp", "length", "group", "stopped", "stop_logp")


def whole_sequence_scores(
    model: torch.nn.Module,
    rollouts: Rollouts,
    engine_config: EngineConfig,
    scores0: ScoresLike | None,
    arg: str = "scores0",
) -> dict[str, np.ndarray]:
    """Per-row numpy arrays of p0's whole-sequence scores (EOS counted), computed when None.

    The probe always scores whole sequences (the proposal drew every token, the stop included);
    ``include_eos=False`` is applied afterwards (:func:`counted`), as the run pipeline does.
    """
    if scores0 is None:
        cfg = replace(engine_config, requires_grad=False, include_eos=True)
        return LogProbEngine(cfg).score(model, rollouts).to_numpy()
    if isinstance(scores0, SequenceScores):
        arrays = scores0.to_numpy()
    elif isinstance(scores0, Mapping):
        arrays = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in scores0.items()}
    else:
        raise TypeError(
            f"{arg} must be SequenceScores, a dict of arrays (SequenceScores.to_numpy()) "
            f"or None; got {type(scores0).__name__}."
        )
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{arg} lacks {missing}: pass LogProbEngine(...).score(model0, rollouts) or its .to_numpy() dict."
        )
    want = rollouts.lengths.cpu().numpy()  # [N], EOS counted
    if arrays["length"].shape != want.shape or not np.array_equal(arrays["length"], want):
        raise ValueError(
            f"{arg} does not belong to these rollouts scored whole: its lengths differ from "
            "rollouts.lengths (EOS counted). Score p0 with EngineConfig(include_eos=True) on the "
            "same rollouts; the probe drops the stop token itself when engine_config.include_eos "
            "is False."
        )
    return arrays


def counted(arrays: Mapping[str, np.ndarray], include: str) -> tuple[np.ndarray, np.ndarray]:
    """S' and L' [N] float64: whole-sequence S, L minus the stop position when "no_eos"."""
    s = np.asarray(arrays["logp"], dtype=np.float64)
    length = np.asarray(arrays["length"], dtype=np.float64)
    if include == "all":
        return s, length
    stop = np.asarray(arrays["stopped"], dtype=bool) & (length > 0)
    return s - np.where(stop, arrays["stop_logp"], 0.0), length - stop


def prompt_codes(group: np.ndarray, arg: str = "rollouts.group") -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids [P] (sorted) and each row's code in [0, P) [N]; every prompt needs G_p ≥ 2."""
    labels, codes, sizes = np.unique(np.asarray(group), return_inverse=True, return_counts=True)
    if (sizes < 2).any():
        raise ValueError(
            f"{arg}: prompts {labels[sizes < 2][:5].tolist()} have one row; a "
            "within-prompt covariance (and the leave-one-out baseline) needs G_p ≥ 2. "
            "Sample at least 2 completions per prompt."
        )
    return labels, codes


def centred_coefficients(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """c_i = −(x_i − x̄_p)/(G_p − 1) [N]: Σ_{i∈p} c_i D_i = −Cov_p(x, D) (ddof 1, LOO baseline)."""
    sizes = np.bincount(codes).astype(np.float64)
    mean = np.bincount(codes, weights=x) / sizes
    return -(x - mean[codes]) / (sizes[codes] - 1.0)


# ---------------------------------------------------------------------------- backward passes
class _GradOnly:
    """Context: requires_grad on exactly the direction's parameters; the old flags restored."""

    def __init__(self, model: torch.nn.Module, names) -> None:
        self.model, self.names = model, set(names)

    def __enter__(self):
        self.saved = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self.names)  # frozen parameters of d still need a gradient
        return self

    def __exit__(self, *exc) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.saved[n])


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode inside; each module's own train/eval mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training


_BLOCK = 1 << 22  # elements per block of the sums below: a [262144, 640] embedding is 40 of them


def _dot(grads, dirs, dtype: torch.dtype | None = None) -> float:
    """Σ_params ⟨g, d⟩ summed in float64, a block of each parameter at a time (no flattened copy,
    no whole-tensor temporary); products in ``dtype`` (default: the wider of the two, ≥ float32)."""
    total = 0.0
    for g, d in zip(grads, dirs):
        if g is not None:
            t = dtype or torch.promote_types(torch.promote_types(g.dtype, d.dtype), torch.float32)
            g, d = g.detach().reshape(-1), d.detach().reshape(-1)
            for s in range(0, g.numel(), _BLOCK):
                a, b = g[s : s + _BLOCK].to(t), d[s : s + _BLOCK].to(g.device, t)
                total += float(torch.sum(a * b, dtype=torch.float64))
    return total


def _directional(model, engine, rollouts, codes, coefs, direction, n_prompts) -> tuple[np.ndarray, int]:
    """Per-prompt ⟨∇(Σ_i c_i S_i + Σ_i e_i log p(stop_i)), d⟩ for each (c, e) in ``coefs``: [K, P]."""
    params = check_direction(model, direction)
    names = list(params)
    plist, dirs = [params[n] for n in names], [direction[n] for n in names]
    mask = rollouts.mask(True)  # [N, C]
    codes_t = torch.as_tensor(codes)
    out, n_backward = np.zeros((len(coefs), n_prompts)), 0
    with _GradOnly(model, names):
        for p in range(n_prompts):
            # never mix prompts in a micro-batch: each backward then belongs to one prompt
            for rows in engine.micro_batches(rollouts, mask & (codes_t == p)[:, None].to(mask.device)):
                out[:, p] += _backward_batch(model, engine, rollouts, rows, coefs, plist, dirs)
                n_backward += len(coefs)
    return out, n_backward


def _backward_batch(model, engine, rollouts, rows, coefs, plist, dirs) -> np.ndarray:
    """One forward with a graph, one backward per coefficient pair; their ⟨grad, d⟩ [K]."""
    sc = engine.score(model, rollouts.select(rows))
    s, stop = sc.logp, sc.stop_logp  # [n] float64, with graph
    del sc  # drop the entropy/varentropy outputs so their part of the graph is freed
    idx = rows.cpu().numpy()
    losses = []
    for c, e in coefs:
        loss = (torch.as_tensor(c[idx], device=s.device) * s).sum()
        if e is not None:
            loss = loss + (torch.as_tensor(e[idx], device=s.device) * stop).sum()
        losses.append(loss)
    if not all(torch.isfinite(x) for x in losses):
        raise FloatingPointError(
            f"non-finite probe loss on rows {idx[:8].tolist()}: a counted token has log p = -inf "
            "under the engine's transform, or the model overflowed. Score with the transform the "
            "rows were sampled with."
        )
    vals = np.zeros(len(losses))
    for k, loss in enumerate(losses):
        if loss.requires_grad:  # else no parameter of d reaches these rows: ⟨grad, d⟩ = 0
            grads = torch.autograd.grad(loss, plist, retain_graph=k < len(losses) - 1, allow_unused=True)
            vals[k] = _dot(grads, dirs)
            del grads
    return vals


# ---------------------------------------------------------------------------- public entry
def gradient_delta(
    model0: torch.nn.Module,
    rollouts: Rollouts,
    direction: Direction,
    *,
    per_token: bool = False,
    engine_config: EngineConfig | None = None,
    scores0: ScoresLike | None = None,
    level: float = 0.95,
) -> GradientDelta:
    r"""Parameter-space ΔH₁ = ⟨∇θ H(θ0), d⟩ from samples of p0 (score-function probe loss).

    ΔH₁ = (1/P) Σ_p A_p,  A_p = −1/(G_p − 1) Σ_{i∈p} (S0_i − S̄0_p)·⟨∇θ S0_i, d⟩, the gradient
    of the probe loss ℓ_H = −(1/P) Σ_p (1/G_p) Σ_{i∈p} stopgrad(S0_i − b_i)·S0_i (b_i the
    leave-one-out mean of S0 in the prompt) along d; unbiased for ⟨∇H, d⟩ with H the
    equal-prompt-mass entropy of ``estimate``. The derivation, the entropy-rate gradient and
    the no-EOS term are in the module docstring. The model's parameters, ``requires_grad``
    flags, ``.grad`` buffers and train/eval mode are left as they were.

    Parameters
    ----------
    model0 : HF causal LM at θ0 (the sampler of ``rollouts``)
    rollouts : Rollouts
        N = Σ_p G_p samples of p0, G_p ≥ 2 per prompt.
    direction : mapping name → Tensor
        d = θ1 − θ0 (:func:`~isdelta.probes.parameter_delta`), any subset of ``model0.named_parameters()``
        (parameters not named are held fixed), any device.
    per_token : bool
        Also estimate the entropy-rate ΔH₁_tok = ⟨∇(H/E[L]), d⟩ (a second backward per
        micro-batch); ``value`` then reports it.
    engine_config : EngineConfig, optional
        The sampling transform, ``token_budget`` (micro-batch size) and ``include_eos`` (False:
        entropy without the stop token's position). ``requires_grad`` is managed here.
    scores0 : SequenceScores or dict of arrays, optional
        p0's whole-sequence scores of ``rollouts`` (EOS counted) when already computed; else a
        no-grad scoring pass runs first (the probe's coefficients need every row's S0).
    level : float
        Coverage of the normal CIs.

    Returns
    -------
    GradientDelta
        Sequence-level (and per-token) ΔH₁ in nats with between-prompt SEs, per-prompt values.

    References
    ----------
    Williams, R. J. (1992). Simple statistical gradient-following algorithms for connectionist
    reinforcement learning. Machine Learning 8:229-256. https://doi.org/10.1007/BF00992696
    Kool, W., van Hoof, H., Welling, M. (2019). Buy 4 REINFORCE samples, get a baseline for
    free! ICLR workshop DeepRLStructPred (the leave-one-out baseline).
    """
    if not isinstance(rollouts, Rollouts):
        raise TypeError(f"rollouts must be an isdelta Rollouts; got {type(rollouts).__name__}.")
    base = engine_config or EngineConfig()
    include = "all" if base.include_eos else "no_eos"
    # the backward must run in the engine's forward mode (eval), or a checkpointed layer (TRL
    # enables gradient checkpointing) recomputes another graph; every module's mode is restored
    with _eval_mode(model0):
        return _probe(model0, rollouts, direction, base, include, scores0, per_token, level)


def _probe(model0, rollouts, direction, base, include, scores0, per_token, level) -> GradientDelta:
    arrays = whole_sequence_scores(model0, rollouts, base, scores0)
    labels, codes = prompt_codes(arrays["group"])
    s, length = counted(arrays, include)  # [N] S', L'
    stop_coef = None
    if include == "no_eos":  # +E_p[1[stopped]·∇log p(stop)] (module docstring)
        sizes = np.bincount(codes).astype(np.float64)
        stop = np.asarray(arrays["stopped"], dtype=bool) & (np.asarray(arrays["length"]) > 0)
        stop_coef = stop / sizes[codes]
    coefs = [(centred_coefficients(s, codes), stop_coef)]
    if per_token:
        coefs.append((centred_coefficients(length, codes), None))
    engine = LogProbEngine(replace(base, requires_grad=True, include_eos=True, progress=False))
    out, n_backward = _directional(model0, engine, rollouts, codes, coefs, direction, len(labels))
    return _result(out, labels, codes, s, length, direction, include, per_token, n_backward, level)


def _mean_se(x: np.ndarray, level: float) -> Estimate:
    """Mean over prompts with the between-prompt SE sd/√P (nan for one prompt)."""
    se = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else math.nan
    return Estimate.normal(float(np.mean(x)), se, level, z_value(level))


def _result(out, labels, codes, s, length, direction, include, per_token, n_backward, level):
    """Assemble GradientDelta from the per-prompt directional derivatives [K, P]."""
    sizes = np.bincount(codes).astype(np.float64)
    h0 = float(np.mean(np.bincount(codes, weights=-s) / sizes))  # equal prompt mass
    lam = float(np.mean(np.bincount(codes, weights=length) / sizes))
    h_tok = h0 / lam if lam > 0 else math.nan
    tok = (out[0] + h_tok * out[1]) / lam if per_token else None  # [P] (A_p + h B_p)/Λ
    norm = math.sqrt(_dot(direction.values(), direction.values(), torch.float64))
    return GradientDelta(
        delta1=_mean_se(out[0], level),
        delta1_tok=None if tok is None else _mean_se(tok, level),
        per_prompt=out[0],
        per_prompt_tok=tok,
        prompts=labels,
        h0=h0,
        h0_tok=h_tok,
        mean_length=lam,
        direction_norm=norm,
        include=include,
        per_token=per_token,
        n_rows=len(codes),
        n_prompts=len(labels),
        n_backward=n_backward,
    )
