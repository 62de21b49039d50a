"""A monitored step's verdict: the estimates on the step's rows, the headline the policy of
DESIGN.md §5.4 picks from them, and the :class:`MonitorResult` a training loop logs.

A step is invalid, with the reason, when its rows cannot be estimated (non-finite scores, no
prompt with two rows), an estimator fails, or no method's preconditions hold on the sample
(:func:`isdelta.estimators.headline`: then the reason names the failed checks and the advice
what would make the step readable); nothing here raises into the training loop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isdelta.estimators import (
    EntropyDelta,
    Estimate,
    EstimatorWarning,
    Headline,
    TokenDelta,
    estimate,
    estimate_tokens,
    headline,
)
from isdelta.training.rows import TOKEN_FIELDS, multi_row_groups

__all__ = [
    "Judgement",
    "MonitorError",
    "MonitorResult",
    "MonitorWarning",
    "describe",
    "estimate_rows",
    "estimate_rows_per_decision",
    "judge_rows",
]

Failure = tuple[str, BaseException | None]  # (reason, the exception when there was one)


class MonitorError(RuntimeError):
    """A step could not be measured (raised only with ``strict=True``)."""


class MonitorWarning(UserWarning):
    """A step could not be measured; the training run goes on (``result.valid`` is False)."""


def describe(exc: BaseException, limit: int = 400) -> str:
    """``Type: message``, shortened."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def estimate_rows(rows: dict, *, weights: str, clip: float | None, prompts: str, level: float):
    """Sequence-level SNIS on a step's merged rows: ``(estimate, rb, n_dropped, notes, failure)``.

    Rows whose prompt has a single row in the step are left out (noted); RB estimates when the
    rows carry p0's entropy sums.
    """
    notes: list[str] = []
    try:
        bad = ~(np.isfinite(rows["log_p0"]) & np.isfinite(rows["log_p1"]))
        if bad.any():
            reason = (
                f"{int(bad.sum())} of {bad.size} rows have a non-finite log-probability (a "
                "token outside the top-k/top-p set of the engine's transform, or a NaN or "
                "overflowing forward): check that the engine's transform is the sampler's, and "
                "that the step did not break the weights (lr)."
            )
            return None, False, 0, notes, (reason, None)
        keep = multi_row_groups(rows["group"])
        n_dropped = int((~keep).sum())
        if n_dropped:
            notes.append(f"{n_dropped} rows left out: their prompt has a single row in this step.")
        if keep.sum() < 2:
            reason = (
                "no prompt has two or more rows in this step: SNIS needs G >= 2 samples per "
                "prompt (use num_generations >= 2 and whole groups per optimizer step)."
            )
            return None, False, n_dropped, notes, (reason, None)
        r = {k: (None if v is None else v[keep]) for k, v in rows.items()}
        rb = r["entropy_sum0"] is not None
        tq = r.get("token_logq")  # a proposal q ≠ p0 (verl's rollout log-probs): H0 by p0/q, H1 by p1/q
        log_q = None if tq is None else np.where(r["mask"], tq, 0.0).sum(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)  # kept in est.warnings
            est = estimate(
                r["log_p0"],
                r["log_p1"],
                r["length"],
                r["group"],
                entropy_sum0=r["entropy_sum0"],
                entropy_sum1=r["entropy_sum1"],
                weights=weights,
                clip=clip,
                prompts=prompts,
                level=level,
                stopped=r["stopped"],
                log_q=log_q,
            )
    except Exception as exc:
        return None, False, 0, notes, (f"estimation failed: {describe(exc)}", exc)
    return est, rb, n_dropped, notes, None


def estimate_rows_per_decision(rows: dict, *, methods: tuple[str, ...], prompts: str, level: float):
    """``(TokenDelta per method, failure)``: the per-decision estimators on the rows that
    ``estimate_rows`` kept, in the policy's order (e.g. ``("cv", "pd_sn")``)."""
    keep = multi_row_groups(rows["group"])
    r = {k: rows[k][keep] for k in TOKEN_FIELDS + ("group",)}
    arrays = (r["token_logp0"], r["token_logp1"], r["token_entropy0"], r["token_entropy1"], r["mask"], r["group"])
    tq = rows.get("token_logq")
    tq = None if tq is None else tq[keep]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimatorWarning)  # kept in each result's warnings
            kw = {"prompts": prompts, "level": level, "token_logq": tq}
            return [estimate_tokens(*arrays, method=m, **kw) for m in methods], None
    except Exception as exc:
        return [], (f"per-decision estimation failed: {describe(exc)}", exc)


@dataclass
class Judgement:
    """Everything :func:`judge_rows` found on a step's rows; :meth:`result` makes the logged result."""

    est: EntropyDelta | None = None
    per_decision: list[TokenDelta] = field(default_factory=list)
    rb: bool = False
    n_rows: int = 0
    n_dropped: int = 0
    notes: list[str] = field(default_factory=list)
    chosen: Headline | None = None
    failure: Failure | None = None

    def result(self, step: int, *, notes=(), seconds: float = 0.0, gap: float | None = None) -> MonitorResult:
        """The step's :class:`MonitorResult`; ``notes`` (what the input checks did) lead its warnings."""
        chosen, failure = self.chosen, self.failure
        # the per-decision result the headline chose (its direct / path-shift split is logged), else the first
        method = chosen.method if chosen is not None else None
        pd = self.per_decision
        tokens = next((t for t in pd if t.method == method), pd[0] if pd else None)
        warned = (self.est.warnings if self.est is not None else ()) + (tokens.warnings if tokens is not None else ())
        return MonitorResult(
            step,
            failure is None,
            None if failure is None else failure[0],
            self.est,
            self.rb,
            self.n_rows - self.n_dropped,
            self.n_dropped,
            seconds,
            gap,
            tuple(notes) + tuple(self.notes) + warned,
            tokens=tokens,
            headline=chosen,
            valid_tok=failure is None or (chosen is not None and chosen.valid_tok),
        )


def judge_rows(rows: dict | None, config, *, failure: Failure | None = None, support_size: int | None = None):
    """Estimate a step's merged rows and pick the headline (DESIGN.md §5.4): a :class:`Judgement`.

    ``rows`` as :func:`isdelta.training.rows.merge` makes them (optionally with ``token_logq``
    [N, C], a proposal's per-token log-probs); ``config`` a :class:`MonitorConfig` (``weights``,
    ``clip``, ``prompts``, ``level``, ``per_decision``); ``failure`` a failure found before
    estimating (then nothing is estimated). Never raises.
    """
    c = config
    j = Judgement(n_rows=0 if rows is None else len(rows["log_p0"]), failure=failure)
    if j.failure is None:
        j.est, j.rb, j.n_dropped, j.notes, j.failure = estimate_rows(
            rows, weights=c.weights, clip=c.clip, prompts=c.prompts, level=c.level
        )
    if j.failure is None and rows.get("token_entropy0") is not None:
        methods = tuple(dict.fromkeys((c.per_decision, "pd", "pd_sn")))  # the policy's order, cv first
        j.per_decision, j.failure = estimate_rows_per_decision(rows, methods=methods, prompts=c.prompts, level=c.level)
    if j.failure is None:
        try:
            j.chosen = headline(j.est, *j.per_decision, support_size=support_size)
        except Exception as exc:
            j.failure = (f"the headline policy failed: {describe(exc)}", exc)
        else:
            if not j.chosen.valid:
                j.failure = (f"{j.chosen.reason} {j.chosen.advice}", None)
    return j


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class MonitorResult:
    """ΔH of one optimizer step (or why it could not be measured).

    Attributes
    ----------
    step : int
    valid : bool
        The per-sequence verdict: False when the step could not be measured, or the headline
        policy found no method whose preconditions hold on the step's samples, or only its
        per-token level holds (``headline.reason``, ``headline.advice``).
    reason : str or None
        Why ``valid`` is False (with what would make the step readable, when known).
    estimate : EntropyDelta or None
        Everything :func:`isdelta.estimators.estimate` found: sequence-level SNIS (kept for
        inspection even when the step is not valid).
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
        When p0's per-position entropies were scored: the per-decision estimate the headline
        chose, else that of ``MonitorConfig.per_decision`` (the policy's first candidate).
    headline : Headline or None
        The policy's choice (:func:`isdelta.estimators.headline`): the method, why, and the
        estimates ``delta``, ``delta_tok``, ``h0``, ``h1``… that this result reports.
    valid_tok : bool
        The per-token verdict: True whenever ``valid`` is, and also when only the per-token
        level holds (long completions whose sequence-level weights cannot be read): then
        ``delta_tok``, ``h0_tok``, ``h1_tok`` are reported and the per-sequence ones are None.
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
    headline: Headline | None = None
    valid_tok: bool | None = None  # None: the same as ``valid``

    def __post_init__(self) -> None:
        if self.valid_tok is None or self.valid:
            object.__setattr__(self, "valid_tok", bool(self.valid or self.valid_tok))

    @property
    def method(self) -> str:
        """The headline's estimator: "cv", "pd", "pd_sn", "snis_rb", "snis", or "none" (no level valid)."""
        return self.headline.method if self.headline is not None and self.valid_tok else "none"

    def _pick(self, name: str) -> Estimate | None:
        ok = self.valid_tok if name.endswith("_tok") else self.valid
        return getattr(self.headline, name) if self.headline is not None and ok else None

    @property
    def delta(self) -> Estimate | None:
        """ΔH per completion (nats) by ``method``; None when the step is not valid."""
        return self._pick("delta")

    @property
    def delta_tok(self) -> Estimate | None:
        """ΔH per token (entropy rate, nats) by ``method``; None when ``valid_tok`` is False."""
        return self._pick("delta_tok")

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
        ``delta_ci_high``, ``delta_tok``, ``delta_tok_se``, ``delta_tok_ci_low``, ``delta_tok_ci_high``, ``h0``,
        ``h1`` and per token ``h0_tok``, ``h1_tok`` (the figure trainers log as ``entropy``), by
        ``method``, itself logged as a number (``method``: 0 none, 1 snis, 2 snis_rb, 3 pd_sn,
        4 cv, 5 pd; :data:`isdelta.estimators.METHOD_CODES`); beside them sequence-level SNIS
        ``delta_snis``, ``delta_snis_se``, ``delta_snis_ci_low``, ``delta_snis_ci_high``,
        ``delta_tok_snis``; ``direct`` and ``path_shift`` (per-decision split of ΔH, NaN without
        it), ``delta1`` (first-order prediction), ``kl``, ``ess_frac``, ``khat``,
        ``prefix_ess_frac`` (smallest prefix-weight ESS/G), ``valid`` (the per-sequence verdict),
        ``valid_tok`` (the per-token one), ``per_decision``, ``rao_blackwell`` (1.0 / 0.0),
        ``n_rows``, ``seconds``. Estimates are NaN where their level is not valid (a logger that
        averages over steps must not mix in unreliable values): with ``valid_tok`` = 1 and
        ``valid`` = 0, only the per-token ones (``delta_tok``, ``h0_tok``, ``h1_tok``) have
        values; the diagnostics ``ess_frac``, ``khat`` and ``kl`` stay, as they say why.
        """
        nan = float("nan")
        est, ok = self.estimate, self.valid and self.estimate is not None
        ok_tok = self.valid_tok and self.estimate is not None
        tk = self.tokens if ok else None

        def val(e: Estimate | None, attr: str = "value") -> float:
            return getattr(e, attr) if (ok_tok and e is not None) else nan  # _pick gates each level

        d, dt, ds = self.delta, self.delta_tok, self.delta_snis
        out = {
            "delta": val(d),
            "delta_se": val(d, "se"),
            "delta_ci_low": val(d, "ci_low"),
            "delta_ci_high": val(d, "ci_high"),
            "delta_tok": val(dt),
            "delta_tok_se": val(dt, "se"),
            "delta_tok_ci_low": val(dt, "ci_low"),
            "delta_tok_ci_high": val(dt, "ci_high"),
            **{k: val(self._pick(k)) for k in ("h0", "h1", "h0_tok", "h1_tok")},
            "method": float(self.headline.code) if self.headline is not None and self.valid_tok else 0.0,
            "delta_snis": val(ds) if ok else nan,
            "delta_snis_se": val(ds, "se") if ok else nan,
            "delta_snis_ci_low": val(ds, "ci_low") if ok else nan,
            "delta_snis_ci_high": val(ds, "ci_high") if ok else nan,
            "delta_tok_snis": val(self.delta_tok_snis) if ok else nan,
            "direct": val(tk.direct if tk else None),
            "path_shift": val(tk.path_shift if tk else None),
            "delta1": est.delta1.value if ok else nan,
            "kl": est.kl if est is not None else nan,
            "ess_frac": est.ess_frac if est is not None else nan,
            "khat": est.khat if est is not None else nan,
            "prefix_ess_frac": tk.prefix_ess_frac_min if tk is not None else nan,
            "valid": float(self.valid),
            "valid_tok": float(self.valid_tok),
            "per_decision": float(self.tokens is not None),
            "rao_blackwell": float(self.rao_blackwell),
            "n_rows": float(self.n_rows),
            "seconds": float(self.seconds),
        }
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        """JSON-safe: the scalars (None for NaN), the reason, warnings and the full estimate."""
        out: dict[str, Any] = {k: (v if math.isfinite(v) else None) for k, v in self.scalars(prefix="").items()}
        out.update(
            step=self.step,
            valid=self.valid,
            valid_tok=self.valid_tok,
            reason=self.reason,
            n_dropped=self.n_dropped,
            old_logp_gap=self.old_logp_gap,
            warnings=list(self.warnings),
            method=self.method,
            headline=None if self.headline is None else self.headline.to_dict(),
            estimate=None if self.estimate is None else self.estimate.to_dict(),
            tokens=None if self.tokens is None else self.tokens.to_dict(),
        )
        return out

    def __str__(self) -> str:
        if self.valid_tok and not self.valid:
            return f"step {self.step}: ΔH per token {self.delta_tok} ({self.method}); per sequence not valid ({self.reason})"
        if not self.valid:
            return f"step {self.step}: invalid ({self.reason})"
        line = f"step {self.step}: ΔH {self.delta} | per token {self.delta_tok}"
        if self.tokens is not None:
            line += f" ({self.method}; SNIS ΔH {self.delta_snis})"
        return line
