"""Result and option types of the training-loop monitor (:mod:`isdelta.training.monitor`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from isdelta.engine.logprob import EngineConfig
from isdelta.engine.rollouts import Rollouts
from isdelta.estimators import EntropyDelta, Estimate, TokenDelta
from isdelta.estimators.inputs import check_options

__all__ = ["MonitorConfig", "MonitorError", "MonitorResult", "MonitorWarning", "Snapshot"]

RaoBlackwell = Literal["auto", "always", "never"]
GroupBy = Literal["prompt", "given"]
Distributed = Literal["auto", "local"]
Weights = Literal["psis", "none", "truncate", "clip"]
PerDecision = Literal["cv", "pd", "pd_sn", "off"]


class MonitorError(RuntimeError):
    """A step could not be measured (raised only with ``strict=True``)."""


class MonitorWarning(UserWarning):
    """A step could not be measured; the training run goes on (``result.valid`` is False)."""


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class MonitorConfig:
    """Options of :class:`EntropyMonitor` (see its docstring for each)."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(progress=False))
    weights: Weights = "psis"
    clip: float | None = None
    level: float = 0.95
    prompts: Literal["fixed", "sampled"] = "fixed"
    every: int = 1
    strict: bool = False
    rao_blackwell: RaoBlackwell = "auto"
    group_by: GroupBy = "prompt"
    distributed: Distributed = "auto"
    per_decision: PerDecision = "cv"

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise TypeError(f"engine_config: expected an isdelta EngineConfig; got "
                            f"{type(self.engine).__name__}. Build one with EngineConfig(temperature=…).")
        check_options(weights=self.weights, prompts=self.prompts, level=self.level, clip=self.clip)
        if isinstance(self.every, bool) or int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every: expected a positive integer (measure every k-th step); "
                             f"got {self.every!r}.")
        for name, value, valid in (("rao_blackwell", self.rao_blackwell, ("auto", "always", "never")),
                                   ("group_by", self.group_by, ("prompt", "given")),
                                   ("distributed", self.distributed, ("auto", "local")),
                                   ("per_decision", self.per_decision, ("cv", "pd", "pd_sn", "off"))):
            if value not in valid:
                raise ValueError(f"{name}: expected one of {list(valid)}; got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- results
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
        Why p0 could not be scored (non-strict mode); ``after`` turns it into an invalid result.
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

    @property
    def n_rows(self) -> int:
        return 0 if self.rollouts is None else self.rollouts.n_rows

    def to_dict(self) -> dict:
        """Summary without per-row data."""
        return {"step": self.step, "measured": self.measured, "n_rows": self.n_rows,
                "rao_blackwell": self.entropy_sum0 is not None,
                "per_decision": self.token_entropy0 is not None,
                "reused_old_logp": self.reused_old_logp, "old_logp_gap": self.old_logp_gap,
                "seconds": self.seconds, "error": self.error}


@dataclass(frozen=True)
class MonitorResult:
    """ΔH of one optimizer step (or why it could not be measured).

    Attributes
    ----------
    step : int
    valid : bool
        False when the step could not be measured or the estimate is unreliable (k̂ > 1).
    reason : str or None
        Why ``valid`` is False.
    estimate : EntropyDelta or None
        Everything :func:`isdelta.estimators.estimate` found: sequence-level SNIS (kept even
        when k̂ > 1).
    rao_blackwell : bool
        The SNIS numbers are the Rao–Blackwellised ones (p0's entropies were scored).
    n_rows, n_dropped : int
        Rows estimated on (all ranks), and rows left out because their prompt had one row.
    seconds : float
        The monitor's wall time for this step: both forwards, the gather and the estimates.
    old_logp_gap : float or None
        See :attr:`Snapshot.old_logp_gap` (the largest over micro-batches).
    warnings : tuple of str
        The estimators' diagnostic warnings and the monitor's notes.
    tokens : TokenDelta or None
        The per-decision estimate (:func:`isdelta.estimators.estimate_tokens`, method
        ``MonitorConfig.per_decision``) when p0's per-position entropies were scored; it is
        the headline (``delta``, ``delta_tok``): same estimand as SNIS, lower variance.
    """

    step: int
    valid: bool
    reason: str | None = None
    estimate: EntropyDelta | None = None
    rao_blackwell: bool = False
    n_rows: int = 0
    n_dropped: int = 0
    seconds: float = 0.0
    old_logp_gap: float | None = None
    warnings: tuple[str, ...] = ()
    tokens: TokenDelta | None = None

    @property
    def method(self) -> str:
        """The headline's estimator: "cv" / "pd" / "pd_sn" (per decision), "snis_rb" or "snis"."""
        if self.tokens is not None:
            return self.tokens.method
        return "snis_rb" if self.rao_blackwell else "snis"

    @property
    def delta(self) -> Estimate | None:
        """ΔH per completion (nats) by ``method``; None without an estimate."""
        if self.tokens is not None:
            return self.tokens.delta
        return self.delta_snis

    @property
    def delta_tok(self) -> Estimate | None:
        """ΔH per token (entropy rate, nats) by ``method``."""
        if self.tokens is not None:
            return self.tokens.delta_tok
        return self.delta_tok_snis

    @property
    def delta_snis(self) -> Estimate | None:
        """Sequence-level SNIS ΔH per completion (RB when available), reported beside the headline."""
        if self.estimate is None:
            return None
        return self.estimate.delta_rb if self.rao_blackwell else self.estimate.delta

    @property
    def delta_tok_snis(self) -> Estimate | None:
        """Sequence-level SNIS ΔH per token (RB when available)."""
        if self.estimate is None:
            return None
        return self.estimate.delta_tok_rb if self.rao_blackwell else self.estimate.delta_tok

    def scalars(self, prefix: str = "entropy/") -> dict[str, float]:
        """A flat ``{name: float}`` for any logger (nats; NaN where there is no valid number).

        Keys (after ``prefix``): the headline ``delta``, ``delta_se``, ``delta_ci_low``,
        ``delta_ci_high``, ``delta_tok``, ``delta_tok_ci_low``, ``delta_tok_ci_high``, ``h0``,
        ``h1`` (by ``method``); beside them sequence-level SNIS ``delta_snis``,
        ``delta_snis_se``, ``delta_snis_ci_low``, ``delta_snis_ci_high``, ``delta_tok_snis``;
        ``direct`` and ``path_shift`` (per-decision split of ΔH, NaN without it), ``delta1``
        (first-order prediction), ``kl``, ``ess_frac``, ``khat``, ``prefix_ess_frac`` (smallest
        prefix-weight ESS/G), ``valid``, ``per_decision``, ``rao_blackwell`` (1.0 / 0.0),
        ``n_rows``, ``seconds``. Estimates are NaN when the result is invalid (a logger that
        averages over steps must not mix in unreliable values); the diagnostics ``ess_frac``
        and ``khat`` stay, as they say why.
        """
        nan = float("nan")
        est, ok = self.estimate, self.valid and self.estimate is not None
        tk = self.tokens if ok else None

        def val(e: Estimate | None, attr: str = "value") -> float:
            return getattr(e, attr) if (ok and e is not None) else nan

        if tk is not None:
            h0, h1 = tk.h0, tk.h1
        else:
            h0 = (est.h0_rb if self.rao_blackwell else est.h0) if ok else None
            h1 = (est.h1_rb if self.rao_blackwell else est.h1) if ok else None
        d, dt, ds = self.delta, self.delta_tok, self.delta_snis
        out = {
            "delta": val(d), "delta_se": val(d, "se"),
            "delta_ci_low": val(d, "ci_low"), "delta_ci_high": val(d, "ci_high"),
            "delta_tok": val(dt), "delta_tok_ci_low": val(dt, "ci_low"), "delta_tok_ci_high": val(dt, "ci_high"),
            "h0": val(h0), "h1": val(h1),
            "delta_snis": val(ds), "delta_snis_se": val(ds, "se"),
            "delta_snis_ci_low": val(ds, "ci_low"), "delta_snis_ci_high": val(ds, "ci_high"),
            "delta_tok_snis": val(self.delta_tok_snis),
            "direct": val(tk.direct if tk else None), "path_shift": val(tk.path_shift if tk else None),
            "delta1": est.delta1.value if ok else nan, "kl": est.kl if ok else nan,
            "ess_frac": est.ess_frac if est is not None else nan,
            "khat": est.khat if est is not None else nan,
            "prefix_ess_frac": tk.prefix_ess_frac_min if tk is not None else nan,
            "valid": float(self.valid), "per_decision": float(self.tokens is not None),
            "rao_blackwell": float(self.rao_blackwell),
            "n_rows": float(self.n_rows), "seconds": float(self.seconds),
        }
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        """JSON-safe: the scalars (None for NaN), the reason, warnings and the full estimate."""
        out: dict[str, Any] = {k: (v if math.isfinite(v) else None)
                               for k, v in self.scalars(prefix="").items()}
        out.update(step=self.step, valid=self.valid, reason=self.reason, n_dropped=self.n_dropped,
                   old_logp_gap=self.old_logp_gap, warnings=list(self.warnings),
                   method=self.method,
                   estimate=None if self.estimate is None else self.estimate.to_dict(),
                   tokens=None if self.tokens is None else self.tokens.to_dict())
        return out

    def __str__(self) -> str:
        if not self.valid:
            return f"step {self.step}: invalid ({self.reason})"
        line = f"step {self.step}: ΔH {self.delta} | per token {self.delta_tok}"
        if self.tokens is not None:
            line += f" ({self.method}; SNIS ΔH {self.delta_snis})"
        return line
