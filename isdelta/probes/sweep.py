r"""Step-size sweep: the true ΔH(α) of p_α = θ0 + α·d against ΔH₁·α (DESIGN.md §6).

Every α is scored on the SAME samples from p0: one forward pass per α, no resampling, so the
sweep shows where the first-order picture stops holding (ΔH(α) bends away from α·ΔH₁) and where
importance sampling itself stops being trustworthy (ESS falls, k̂ crosses its threshold). At
α = 0 the model is θ0 bit for bit, so ΔH = 0 and ESS = N exactly (a test).

The model is moved in place: the touched parameters are saved once on the CPU, each α writes
θ0 + α·d (computed in float32 or wider, then cast to the parameter's dtype), and θ0 is copied
back at the end (also after an error), so the parameters are bit-identical afterwards; no copy
of the whole model is made on the accelerator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.rollouts import Rollouts
from isdelta.estimators import EntropyDelta, estimate, estimate_per_prompt
from isdelta.outputs import finite_or_none
from isdelta.probes.gradient import (
    GradientDelta,
    ScoresLike,
    centred_coefficients,
    counted,
    prompt_codes,
    whole_sequence_scores,
)
from isdelta.probes.parameters import Direction, check_direction

__all__ = [
    "SweepResult",
    "first_order_parts",
    "first_order_rate",
    "gap_terms",
    "moved_along",
    "per_prompt_points",
    "point_estimate",
    "step_sweep",
]

_PER_ALPHA = ("logp", "entropy_sum", "stop_logp", "stop_entropy_sum")


@contextmanager
def moved_along(model: torch.nn.Module, direction: Direction) -> Iterator:
    """Yield ``move(alpha)`` that writes θ0 + α·d into the model; θ0 is restored bit for bit on exit.

    Only the parameters named in ``direction`` are saved (on the CPU) and touched.
    """
    params = check_direction(model, direction)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}

    def move(alpha: float) -> None:
        with torch.no_grad():
            for n, p in params.items():
                d = direction[n]
                # the sum in float32 or wider: a bf16 θ0 + α·d would round twice
                dtype = torch.promote_types(torch.promote_types(p.dtype, d.dtype), torch.float32)
                p.copy_(saved[n].to(p.device, dtype) + alpha * d.to(p.device, dtype))

    try:
        yield move
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@dataclass(frozen=True, eq=False)
class SweepResult:
    """ΔH(α) on p0's samples for each α, with ΔH₁ in both spaces (see :func:`step_sweep`).

    Attributes
    ----------
    alphas : tuple of float [A]
        Step sizes, ascending.
    estimates : tuple of EntropyDelta [A]
        ``estimate`` of p0 → p_α: ``delta``, ``delta_tok`` (± CI), ``delta1`` (function-space
        ΔH₁ = −Cov_p0(S0, δ_α)), ``cov_term`` + ``kl_term`` = ``delta``, ``ess``, ``khat`` …
    delta1_tok_fs : tuple of float [A]
        Function-space ΔH₁ of the entropy rate, (1/(PΛ)) Σ_p (−Cov_p(S0 + hL, ℓ_α)) (plus the
        no-EOS stop term): the gradient formula of :mod:`isdelta.probes.gradient` with the
        directional derivative D replaced by the log-ratio ℓ_α.
    gradient : GradientDelta or None
        Parameter-space ΔH₁ at α = 1 (its prediction at α is α times it).
    scores0 : dict of ndarray [N]
        p0's whole-sequence scores (``SequenceScores.to_numpy()`` keys).
    scores : dict of ndarray [A, N]
        ``logp``, ``entropy_sum``, ``stop_logp``, ``stop_entropy_sum`` under each p_α.
    include : {"all", "no_eos"}
    estimator_kw : dict
        The options ``estimate`` was called with.
    """

    alphas: tuple[float, ...]
    estimates: tuple[EntropyDelta, ...]
    delta1_tok_fs: tuple[float, ...]
    gradient: GradientDelta | None
    scores0: dict
    scores: dict
    include: Literal["all", "no_eos"]
    estimator_kw: dict

    def delta1_grad(self, per_token: bool = False) -> np.ndarray | None:
        """α·⟨∇H, d⟩ for each α [A] (None without a gradient, or without its per-token value)."""
        g = self.gradient
        est = None if g is None else (g.delta1_tok if per_token else g.delta1)
        return None if est is None else np.asarray(self.alphas) * est.value

    def khat_crossing(self) -> float | None:
        """The smallest α whose k̂ exceeds its threshold (None: none does)."""
        for a, e in zip(self.alphas, self.estimates):
            if math.isfinite(e.khat) and e.khat > e.khat_threshold:
                return a
        return None

    def khat_crossing_interp(self) -> float | None:
        """α where k̂ − threshold crosses 0, linearly interpolated between the two grid points."""
        prev = None
        for alpha, e in zip(self.alphas, self.estimates):
            if not math.isfinite(e.khat):
                continue
            gap = e.khat - e.khat_threshold
            if gap > 0:
                if prev is None:
                    return alpha
                a0, g0 = prev
                return a0 + (alpha - a0) * (-g0) / (gap - g0)
            prev = (alpha, gap)
        return None

    def to_dict(self) -> dict:
        """JSON-safe: one dict per α (the EntropyDelta's, plus ΔH₁ lines), the gradient, options."""
        grad, grad_tok = self.delta1_grad(), self.delta1_grad(per_token=True)
        points = []
        for a, alpha in enumerate(self.alphas):
            d = {
                "alpha": alpha,
                **self.estimates[a].to_dict(),
                "delta1_tok_fs": finite_or_none(self.delta1_tok_fs[a]),
                "delta1_grad": None if grad is None else finite_or_none(grad[a]),
                "delta1_grad_tok": None if grad_tok is None else finite_or_none(grad_tok[a]),
            }
            points.append(d)
        return {
            "alphas": list(self.alphas),
            "points": points,
            "include": self.include,
            "estimator_kw": dict(self.estimator_kw),
            "khat_crossing": self.khat_crossing(),
            "gradient": None if self.gradient is None else self.gradient.to_dict(),
        }


# ---------------------------------------------------------------------------- the sweep
def step_sweep(
    model0: torch.nn.Module,
    direction: Direction,
    rollouts: Rollouts,
    alphas: Sequence[float],
    *,
    engine_config: EngineConfig | None = None,
    estimator_kw: Mapping | None = None,
    scores0: ScoresLike | None = None,
    gradient: GradientDelta | None = None,
) -> SweepResult:
    r"""ΔH(α), ΔH_tok(α) ± CI, ESS, k̂ and ΔH₁ for p_α = θ0 + α·d, all on p0's samples.

    For each α the model is set to θ0 + α·d in place, ``rollouts`` (samples of p0) are scored
    once, and ``estimate(S0, S_α, …)`` gives the SNIS truth with its diagnostics and the
    function-space ΔH₁ = −Cov_p0(S0, S_α − S0) with the exact split ΔĤ = cov_term + kl_term.
    The parameter-space prediction is α·``gradient``. Afterwards the parameters are θ0 bit for
    bit. Estimator warnings are not re-issued (large α is expected to trip them); each point
    keeps its own in ``estimates[a].warnings``.

    Parameters
    ----------
    model0 : HF causal LM at θ0, the sampler of ``rollouts``
    direction : mapping name → Tensor
        d = θ1 − θ0 (:func:`~isdelta.probes.parameter_delta`); α = 1 is the update itself.
    rollouts : Rollouts
        Samples of p0, G_p ≥ 2 per prompt.
    alphas : sequence of float
        Step sizes (finite; sorted and de-duplicated here). Include 0 to check the
        pipeline (ΔH = 0, ESS = N exactly).
    engine_config : EngineConfig, optional
        Transform, ``token_budget``, ``include_eos`` (False: entropies without the stop
        token's position; the weights still use whole sequences).
    estimator_kw : dict, optional
        Options of ``estimate``: weights, prompts, level, clip (``include`` follows
        ``engine_config.include_eos``).
    scores0 : SequenceScores or dict of arrays, optional
        p0's whole-sequence scores of ``rollouts``, scored with the same engine settings (else
        α = 0 is only equal up to batching round-off); computed when None.
    gradient : GradientDelta, optional
        From :func:`~isdelta.probes.gradient_delta` on the same model, rows and direction.

    Returns
    -------
    SweepResult
    """
    alphas = _check_alphas(alphas)
    base = engine_config or EngineConfig()
    include = "all" if base.include_eos else "no_eos"
    kw = _estimator_kw(estimator_kw, include)
    cfg = replace(base, requires_grad=False, include_eos=True)
    arrays0 = whole_sequence_scores(model0, rollouts, cfg, scores0)  # at θ0, before any move
    prompt_codes(arrays0["group"])  # G_p ≥ 2, checked before the forwards
    engine = LogProbEngine(cfg)
    scores = {k: np.empty((len(alphas), rollouts.n_rows)) for k in _PER_ALPHA}  # [A, N]
    with moved_along(model0, direction) as move:
        for a, alpha in enumerate(alphas):
            move(alpha)
            arrays = engine.score(model0, rollouts).to_numpy()
            for k in _PER_ALPHA:
                scores[k][a] = arrays[k]
    estimates, rates = [], []
    for a in range(len(alphas)):
        arrays1 = {k: scores[k][a] for k in _PER_ALPHA}
        estimates.append(point_estimate(arrays0, arrays1, include, kw))
        rates.append(first_order_rate(arrays0, arrays1, include))
    return SweepResult(alphas, tuple(estimates), tuple(rates), gradient, dict(arrays0), scores, include, kw)


def _check_alphas(alphas) -> tuple[float, ...]:
    try:
        vals = sorted({float(a) for a in alphas})
    except (TypeError, ValueError) as e:
        raise TypeError(f"alphas must be a sequence of numbers, e.g. [0.25, 0.5, 1, 2, 4]; got {alphas!r}.") from e
    if not vals or not all(math.isfinite(a) for a in vals):
        raise ValueError(
            f"alphas must be a non-empty list of finite step sizes, e.g. [0.25, 0.5, 1, 2, 4]; got {alphas!r}."
        )
    return tuple(vals)


def _estimator_kw(estimator_kw: Mapping | None, include: str) -> dict:
    kw = dict(estimator_kw or {})
    if kw.get("include", include) != include:
        raise ValueError(
            f"estimator_kw['include'] = {kw['include']!r} disagrees with engine_config.include_eos "
            f"(→ {include!r}); the probe takes it from the engine config: drop it from estimator_kw."
        )
    kw.pop("include", None)
    bad = sorted(set(kw) - {"weights", "prompts", "level", "clip"})
    if bad:
        raise ValueError(f"estimator_kw: unknown option(s) {bad}; valid: weights, prompts, level, clip.")
    return kw


def estimate_args(arrays0: Mapping, arrays1: Mapping, include: str) -> tuple[tuple, dict]:
    """``estimate``'s positional and per-row keyword arguments from whole-sequence score arrays of
    p0 and p1 (``SequenceScores.to_numpy()`` keys), counting the stop token or not."""
    extra = {}
    if include == "no_eos":
        extra = {
            "eos_logp0": arrays0["stop_logp"],
            "eos_logp1": arrays1["stop_logp"],
            "eos_entropy_sum0": arrays0["stop_entropy_sum"],
            "eos_entropy_sum1": arrays1["stop_entropy_sum"],
        }
    args = (arrays0["logp"], arrays1["logp"], arrays0["length"], arrays0["group"])
    return args, {
        "entropy_sum0": arrays0["entropy_sum"],
        "entropy_sum1": arrays1["entropy_sum"],
        "include": include,
        "stopped": np.asarray(arrays0["stopped"], dtype=bool),
        **extra,
    }


def point_estimate(arrays0: Mapping, arrays1: Mapping, include: str, kw: Mapping) -> EntropyDelta:
    """``estimate`` of p0 → p1 from whole-sequence score arrays, warnings muted."""
    args, rows = estimate_args(arrays0, arrays1, include)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in .warnings; a sweep expects large α to trip them
        return estimate(*args, **rows, **kw)


def first_order_rate(arrays0: Mapping, arrays1: Mapping, include: str) -> float:
    r"""Function-space ΔH₁ of the entropy rate, (1/(PΛ)) Σ_p (A_p + h B_p).

    A_p = −Cov_p(S0', ℓ) − mean_p(δ' − ℓ) (``estimate``'s ΔH₁_p), B_p = −Cov_p(L', ℓ), with
    ℓ = S1 − S0 (whole sequences), δ' = S1' − S0' (counted), h = H0'/Λ and Λ = E_p0[L'],
    equal prompt mass; ddof 1 covariances. As α → 0, ℓ/α → ⟨∇S, d⟩ and this → α·ΔH₁_tok(gradient).
    """
    a, b, lam, h, _ = first_order_parts(arrays0, arrays1, include)
    return float(np.mean(a + h * b) / lam)


def first_order_parts(arrays0: Mapping, arrays1: Mapping, include: str):
    """A_p [P], B_p [P], Λ, h and G_p [P] of :func:`first_order_rate` (prompts sorted by id)."""
    merged = {**arrays0, **{k: arrays1[k] for k in ("logp", "stop_logp")}}
    s0, length = counted(arrays0, include)  # [N]
    s1, _ = counted(merged, include)
    _, codes = prompt_codes(arrays0["group"])
    sizes = np.bincount(codes).astype(np.float64)
    ell = np.asarray(arrays1["logp"], dtype=np.float64) - np.asarray(arrays0["logp"], dtype=np.float64)
    stop_term = np.bincount(codes, weights=(s1 - s0) - ell) / sizes  # 0 with include="all"
    a = np.bincount(codes, weights=centred_coefficients(s0, codes) * ell) - stop_term  # [P]
    b = np.bincount(codes, weights=centred_coefficients(length, codes) * ell)  # [P]
    lam = float(np.mean(np.bincount(codes, weights=length) / sizes))
    h = float(np.mean(np.bincount(codes, weights=-s0) / sizes)) / lam
    return a, b, lam, h, sizes


def gap_terms(result: SweepResult, a: int) -> dict[str, float]:
    r"""ΔĤ − ΔH₁ (function space) at step index ``a``, split exactly into three parts.

    With C = (1/P) Σ_p C_p, C_p = −Cov_p(S0', ℓ) (ddof 1) and ΔH₁ = C + X (X the no-EOS stop
    term, 0 with include="all"):

    - ``sample_size`` = −(1/P) Σ_p C_p / G_p: self-normalising within a prompt of G_p rows turns
      the ddof-1 covariance into a ddof-0 one, so to first order E[ΔĤ] = (1 − 1/G)·ΔH: the SNIS
      ΔĤ itself is biased towards 0 by ΔH/G (12% at G = 8), even where ΔH is linear in α;
    - ``nonlinear`` = cov_term − (C + sample_size): the weights' e^δ beyond first order;
    - ``kl`` = kl_term − X ≈ −KL(p_α‖p0): second order in α in expectation; in one sample it
      also holds −mean(δ), a zero-mean first-order term.
    """
    arrays1 = {k: result.scores[k][a] for k in _PER_ALPHA}
    s0, _ = counted(result.scores0, result.include)
    _, codes = prompt_codes(result.scores0["group"])
    sizes = np.bincount(codes).astype(np.float64)
    ell = np.asarray(arrays1["logp"]) - np.asarray(result.scores0["logp"], dtype=np.float64)
    c_p = np.bincount(codes, weights=centred_coefficients(s0, codes) * ell)  # [P]
    e = result.estimates[a]
    c, sample_size = float(np.mean(c_p)), float(-np.mean(c_p / sizes))
    return {
        "sample_size": sample_size,
        "nonlinear": e.cov_term - (c + sample_size),
        "kl": e.kl_term - (e.delta1.value - c),
    }


def per_prompt_points(result: SweepResult, alpha: float) -> list[dict]:
    """Per prompt at step ``alpha`` (one of ``result.alphas``): ΔH_p, ΔH₁_p in both spaces.

    Each prompt's ΔH_p and function-space ΔH₁_p come from
    :func:`~isdelta.estimators.estimate_per_prompt` (the run report's rule too). The gradient's
    per-prompt value is α·A_p (no SE: it needs the per-row directional derivatives, which one
    backward per prompt does not give).
    """
    if alpha not in result.alphas:
        raise ValueError(f"alpha={alpha!r} is not a step of this sweep; choose one of {list(result.alphas)}.")
    a = result.alphas.index(alpha)
    arrays1 = {k: result.scores[k][a] for k in _PER_ALPHA}
    args, rows = estimate_args(result.scores0, arrays1, result.include)
    per_prompt = estimate_per_prompt(*args, **rows, **result.estimator_kw)
    g = result.gradient
    out = []
    for p, label in enumerate(prompt_codes(result.scores0["group"])[0]):
        est = per_prompt[label.item()]
        grad = None if g is None else alpha * float(g.per_prompt[p])
        grad_tok = None if g is None or g.per_prompt_tok is None else alpha * float(g.per_prompt_tok[p])
        out.append(
            {
                "prompt": int(label),
                "n": int(est.n_rows),
                "delta": est.delta.to_dict(),
                "delta_tok": est.delta_tok.to_dict(),
                "delta1": est.delta1.to_dict(),
                "cov_term": finite_or_none(est.cov_term),
                "kl_term": finite_or_none(est.kl_term),
                "ess": finite_or_none(est.ess),
                "delta1_grad": grad,
                "delta1_grad_tok": grad_tok,
            }
        )
    return out
