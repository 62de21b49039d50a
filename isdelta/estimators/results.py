"""Result types: ``Estimate`` (value, SE, CI), ``EntropyDelta`` (sequence-level SNIS, what
``estimate`` finds) and ``TokenDelta`` (per-decision, what ``estimate_tokens`` finds).

All values are stored in nats; ``.bits`` converts (bits = nats / ln 2). ``to_dict()`` gives
both units and is JSON-serialisable with ``allow_nan=False`` (non-finite numbers become None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

from isdelta.outputs import finite_or_none

# k̂ above its sample-size threshold is "bad" (and warns) only when the pooled ESS / S is below
# this too: on real SmolLM2 steps the threshold alone fired on 18–64% of light sample sets
# (G = 8–64), the pair on none, and still on 75–84% of the heavy ones (benchmarks/README.md,
# "Ground truth on the real model").
KHAT_ESS_GATE = 0.5

if TYPE_CHECKING:
    from isdelta.estimators.fingerprint import RowsFingerprint
    from isdelta.estimators.proposal import ProposalWeights
    from isdelta.estimators.weights import Weights

__all__ = ["EntropyDelta", "Estimate", "EstimatorWarning", "TokenDelta"]

LN2 = math.log(2.0)


class EstimatorWarning(UserWarning):
    """A diagnostic says an estimate may be unreliable (k̂, ESS, KL, mean ratio, empty rows)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with standard error and a normal confidence interval.

    Attributes
    ----------
    value, se, ci_low, ci_high : float
        The estimate, its standard error and the interval value ∓ z·se, in ``unit``.
    level : float
        Coverage of the interval (e.g. 0.95); z = norm.ppf((1 + level) / 2).
    unit : {"nats", "bits"}
    """

    value: float
    se: float
    ci_low: float
    ci_high: float
    level: float
    unit: Literal["nats", "bits"] = "nats"

    @classmethod
    def normal(cls, value: float, se: float, level: float, z: float) -> Estimate:
        """value ± z·se in nats."""
        return cls(float(value), float(se), value - z * se, value + z * se, float(level))

    def _scaled(self, factor: float, unit: Literal["nats", "bits"]) -> Estimate:
        return Estimate(
            self.value * factor, self.se * factor, self.ci_low * factor, self.ci_high * factor, self.level, unit
        )

    @property
    def bits(self) -> Estimate:
        """The same estimate in bits."""
        return self if self.unit == "bits" else self._scaled(1.0 / LN2, "bits")

    @property
    def nats(self) -> Estimate:
        """The same estimate in nats."""
        return self if self.unit == "nats" else self._scaled(LN2, "nats")

    def covers(self, truth: float) -> bool:
        """Whether ``truth`` (same unit) lies in [ci_low, ci_high]."""
        return self.ci_low <= truth <= self.ci_high

    def to_dict(self) -> dict:
        """{value, se, ci_low, ci_high} in nats, the same with a ``_bits`` suffix, level."""
        n, b = self.nats, self.bits
        out = {k: finite_or_none(getattr(n, k)) for k in ("value", "se", "ci_low", "ci_high")}
        out.update({f"{k}_bits": finite_or_none(getattr(b, k)) for k in ("value", "se", "ci_low", "ci_high")})
        out["level"] = self.level
        return out

    def __str__(self) -> str:
        return (
            f"{self.value:+.5g} ± {self.se:.2g} {self.unit} "
            f"[{self.ci_low:+.5g}, {self.ci_high:+.5g}] ({self.level:.0%})"
        )


def table_head(level: float) -> str:
    """The column header of the summaries' estimate tables (nats and bits, ± se, CI)."""
    ci = f"{level:.0%} CI"
    return f"{'':<22}{'nats':>12}{'± se':>9}  {ci:<26}{'bits':>12}{'± se':>9}  {ci}"


def fields_to_dict(result) -> dict:
    """A result dataclass's fields, JSON-safe: Estimates (and anything with a ``to_dict``) nested,
    tuples as lists, non-finite floats as None."""
    out: dict = {}
    for f in fields(result):
        v = getattr(result, f.name)
        if hasattr(v, "to_dict"):
            out[f.name] = v.to_dict()
        elif isinstance(v, float):
            out[f.name] = finite_or_none(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


ESTIMATES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok")
RB_ESTIMATES = tuple(f"{name}_rb" for name in ESTIMATES)
_LABELS = {
    "h0": "H0 (sequence)",
    "h1": "H1 (sequence)",
    "delta": "ΔH (sequence)",
    "h0_tok": "H0 / token",
    "h1_tok": "H1 / token",
    "delta_tok": "ΔH / token",
    "delta1": "ΔH₁ (first order)",
    "direct": "  direct (p0 paths)",
    "path_shift": "  path shift",
}


@dataclass(frozen=True)
class EntropyDelta:
    """H(p0), H(p1), ΔH with uncertainty, ΔH₁ and SNIS diagnostics (see ``estimate``).

    Entropies are in nats (``.bits`` on each Estimate converts). Sequence-level quantities
    are per completion; ``*_tok`` are entropy rates E[−log p]/E[L] (ratios of means);
    ``*_rb`` are the Rao–Blackwellised versions (None without entropy sums).

    Attributes (diagnostics)
    ------------------------
    delta1 : Estimate
        Function-space first-order prediction ΔH₁ = −Cov_p0(S0, δ), δ = S1 − S0.
    cov_term, kl_term : float
        ΔĤ = cov_term + kl_term exactly: −mean_p((r̃ − 1)(S0 − S̄0)) and −Σ w̄ δ, with the
        weights used.
    kl, kl_max : float
        KL(p1‖p0) ≈ (1/P) Σ_p Σ_{i∈p} w̄_i ℓ_i (nats), and the largest per-prompt KL_p.
    g_min : int
        The smallest number of samples of a prompt (G_p); importance sampling needs
        G_p ≳ exp(KL_p) (Chatterjee & Diaconis 2018).
    ess, ess_frac : float
        Pooled ESS = P² / Σ_p 1/ESS_p, and ESS / N.
    ess_min, ess_mean : float
        Per-prompt ESS_p = 1/Σ w̄², minimum and mean over prompts.
    khat, khat_threshold, s_min : float
        Worst Pareto k̂ over tail fits (nan: not estimable), the threshold
        min(1 − 1/log10 S, 0.7) at the smallest fit size, and S_min = 10^{1/(1−k̂)}.
    mean_ratio_min, mean_ratio_max : float
        Range over prompts of mean_{i∈p} r_i (≈ 1 when p1 and p0 share a support).
    mean_length : float
        E_p0[L] (counted tokens, equal mass per prompt).
    nll0_tok, nll1_tok : float
        Mean over rows of −S/L (per-row per-token NLL, as training logs report it) under p0,
        and SNIS-weighted under p1; rows with L = 0 are skipped.
    no_stop_frac : float or None
        Fraction of rows without a stop token (None when ``stopped`` was not given).
    n_rows, n_prompts, n_empty : int
        N, P, and rows with L = 0.
    weights_used, prompts, include : str
        The weighting scheme (per prompt or pooled), the SE mode and the counted positions.
    warnings : tuple of str
        Every diagnostic warning that ``estimate`` issued.
    weights : Weights
        The weights the estimates used, per row in the caller's order (``w``, ``log_w``) beside
        the raw SNIS weights (``w_raw``), with ESS and k̂ per fit: what reports and plots show,
        so nothing recomputes them; ``to_dict()`` keeps its per-prompt summary.
    proposal : ProposalWeights or None
        With ``log_q`` (rows drawn from q ≠ p0): ESS, k̂, KL(p0‖q) and mean ratio of the H0
        weights p0/q (the fields above then describe the H1 weights p1/q). None when q = p0.
    fingerprint : RowsFingerprint or None
        What identifies the rows (N, prompt layout, lengths, log p0): ``headline`` refuses to
        combine results whose fingerprints differ. ``to_dict()`` keeps N, P and the layout digest.
    """

    h0: Estimate
    h1: Estimate
    delta: Estimate
    h0_tok: Estimate
    h1_tok: Estimate
    delta_tok: Estimate
    h0_rb: Estimate | None
    h1_rb: Estimate | None
    delta_rb: Estimate | None
    h0_tok_rb: Estimate | None
    h1_tok_rb: Estimate | None
    delta_tok_rb: Estimate | None
    delta1: Estimate
    cov_term: float
    kl_term: float
    kl: float
    kl_max: float
    g_min: int
    ess: float
    ess_min: float
    ess_mean: float
    ess_frac: float
    khat: float
    khat_threshold: float
    s_min: float
    mean_ratio_min: float
    mean_ratio_max: float
    mean_length: float
    nll0_tok: float
    nll1_tok: float
    no_stop_frac: float | None
    n_rows: int
    n_prompts: int
    n_empty: int
    weights_used: str
    prompts: str
    include: str
    warnings: tuple[str, ...]
    weights: Weights | None = field(default=None, repr=False, compare=False)
    proposal: ProposalWeights | None = None
    fingerprint: RowsFingerprint | None = field(default=None, repr=False, compare=False)

    @property
    def khat_status(self) -> str:
        """Verdict on k̂: good; "high, ESS fine" (above the threshold while ESS/S ≥
        ``KHAT_ESS_GATE``: a tail fit on few draws, not a warning); bad (above the threshold and
        ESS/S below it); very bad (> 1, ESS/S below it); or not estimable (nan)."""
        if math.isnan(self.khat):
            return "not estimable"
        if self.khat <= self.khat_threshold:
            return "good"
        if self.ess_frac >= KHAT_ESS_GATE:  # a nan ESS vouches for nothing
            return "high, ESS fine"
        return "very bad" if self.khat > 1.0 else "bad"

    def to_dict(self) -> dict:
        """All fields, Estimates as nested dicts (nats and ``_bits``); JSON-safe."""
        out = fields_to_dict(self)
        out["khat_status"] = self.khat_status
        for name in ("kl", "cov_term", "kl_term", "nll0_tok", "nll1_tok"):
            out[f"{name}_bits"] = finite_or_none(getattr(self, name) / LN2)
        return out

    def summary(self) -> str:
        """A readable table: estimates in nats and bits, then diagnostics and warnings."""
        head = table_head(self.delta.level)
        lines = [
            f"isdelta: {self.n_prompts} prompts, {self.n_rows} rows; prompts={self.prompts}; include={self.include}",
            f"weights: {self.weights_used}",
            "",
            head,
            "-" * (len(head) + 14),
        ]
        for name in (*ESTIMATES, *RB_ESTIMATES, "delta1"):
            est = getattr(self, name)
            if est is not None:
                label = _LABELS.get(name) or _LABELS[name[:-3]] + " RB"
                lines.append(_row(label, est))
        for label, v in (("  covariance term", self.cov_term), ("  KL term", self.kl_term)):
            lines.append(f"{label:<22}{v:>+12.5g}{'':>9}  {'':<26}{v / LN2:>+12.5g}")
        lines += ["", *self._diagnostic_lines()]
        if self.warnings:
            lines += ["", "warnings:", *(f"  - {w}" for w in self.warnings)]
        return "\n".join(lines)

    def _diagnostic_lines(self) -> list[str]:
        stop = "n/a" if self.no_stop_frac is None else f"{self.no_stop_frac:.1%}"
        return [
            f"ESS {self.ess:.1f} of {self.n_rows} (ESS/S {self.ess_frac:.3f}); per prompt "
            f"min {self.ess_min:.1f}, mean {self.ess_mean:.1f}",
            f"k̂ {self.khat:.3f} ({self.khat_status}; threshold {self.khat_threshold:.3f}); S_min {self.s_min:.4g}",
            f"KL(p1‖p0) {self.kl:.4g} nats ({self.kl / LN2:.4g} bits); mean r per prompt in "
            f"[{self.mean_ratio_min:.4g}, {self.mean_ratio_max:.4g}]",
            f"mean length {self.mean_length:.2f} tokens; NLL/token p0 {self.nll0_tok:.4g} nats "
            f"({self.nll0_tok / LN2:.4g} bits), p1 {self.nll1_tok:.4g} nats "
            f"({self.nll1_tok / LN2:.4g} bits)",
            f"rows without a stop token {stop}; rows with L = 0: {self.n_empty}",
            *([] if self.proposal is None else [str(self.proposal)]),
        ]


def _row(label: str, est: Estimate) -> str:
    cells = []
    for e in (est.nats, est.bits):
        interval = f"[{e.ci_low:+.4g}, {e.ci_high:+.4g}]"
        cells.append(f"{e.value:>+12.5g}{'± ' + format(e.se, '.2g'):>9}  {interval:<26}")
    return f"{label:<22}" + "".join(cells).rstrip()


TOKEN_ESTIMATES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok", "direct", "path_shift")


@dataclass(frozen=True)
class TokenDelta:
    """H(p0), H(p1), ΔH and entropy rates from per-position scores (see ``estimate_tokens``).

    All entropies in nats (``.bits`` on each Estimate converts).

    Attributes
    ----------
    h0, h1, delta : Estimate
        Sequence-level entropies and ΔH = H1 − H0 (same estimand as ``estimate(...).delta``).
    h0_tok, h1_tok, delta_tok : Estimate
        Entropy rates Σ_p E_p[Σ_t m_t H_t] / Σ_p E_p[L] (ratios of means) and their change.
    direct : Estimate
        mean_i Σ_t m_it (H1_it − H0_it): the entropy change on p0's own prefixes.
    path_shift : Estimate
        delta − direct: the part of ΔH due to p1 visiting other prefixes (paired SE).
    method, beta, prompts : str
        The estimator, how its control variate was chosen, and the SE mode.
    mean_length0, mean_length1 : float
        E_p0[L] and the estimate of E_p1[L] (the per-token denominators), in tokens.
    prefix_ess_min, prefix_ess_frac_min : float
        Smallest per-(prompt, column) ESS of the prefix ratios, (Σ_i ρ_it)² / Σ_i ρ_it², over
        columns that some row of the prompt counts, and the smallest ESS / G_p.
    max_log_rho : float
        Largest |log ρ_it| (the full-sequence ratio included).
    mean_ratio_min, mean_ratio_max : float
        Range over prompts of mean_i r_i, r_i the full-sequence ratio (≈ 1; E_p0[ρ] = 1 is
        what the unnormalised methods rely on).
    n_rows, n_prompts, n_empty : int
        N, P and rows with no counted position.
    warnings : tuple of str
        Every diagnostic warning issued.
    proposal : ProposalWeights or None
        With ``token_logq`` (rows drawn from q ≠ p0): the p0/q weights' ESS (sequence and
        prefix), k̂ and mean ratio; the prefix ESS and ratio fields above are then of p1/q.
    max_length : int or None
        C, the most counted positions a row of these arrays can have: every estimate per
        sequence estimates a sum over t < C, so it is at most C·ln|support| (None: built by hand).
    out_of_bounds : tuple of str
        The physical bounds of entropy that these estimates break (each as the failed check,
        e.g. "H(p1) per sequence vs 12 positions · log|support| 1.3e+194 ✗ (needs ≤ 130)");
        empty when none. ``headline`` refuses this method whenever it is not empty (the same
        checks are among its own).
    terms_khat, terms_khat_tok : float or None
        Pareto k̂ of the per-row terms of ΔH per sequence and per token (``per_decision.terms_khat``;
        None: fewer than 25 nonzero terms): ``headline``'s sequence- and token-level checks.
    fingerprint : RowsFingerprint or None
        What identifies the rows (as ``EntropyDelta.fingerprint``).
    """

    h0: Estimate
    h1: Estimate
    delta: Estimate
    h0_tok: Estimate
    h1_tok: Estimate
    delta_tok: Estimate
    direct: Estimate
    path_shift: Estimate
    method: str
    beta: str
    prompts: str
    mean_length0: float
    mean_length1: float
    prefix_ess_min: float
    prefix_ess_frac_min: float
    max_log_rho: float
    mean_ratio_min: float
    mean_ratio_max: float
    n_rows: int
    n_prompts: int
    n_empty: int
    warnings: tuple[str, ...]
    proposal: ProposalWeights | None = None
    max_length: int | None = None
    out_of_bounds: tuple[str, ...] = ()
    terms_khat: float | None = None
    terms_khat_tok: float | None = None
    fingerprint: RowsFingerprint | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """All fields, Estimates as nested dicts (nats and ``_bits``); JSON-safe."""
        return fields_to_dict(self)

    def scalars(self, prefix: str = "entropy_tokens/") -> dict[str, float]:
        """Flat {name: float} for a metrics logger: each estimate and its SE (nats), and the
        weight diagnostics; non-finite values become nan."""
        out = {}
        for name in TOKEN_ESTIMATES:
            est = getattr(self, name)
            out[f"{prefix}{name}"] = est.value
            out[f"{prefix}{name}_se"] = est.se
        for name in ("prefix_ess_frac_min", "max_log_rho", "mean_length0", "mean_length1"):
            out[f"{prefix}{name}"] = float(getattr(self, name))
        if self.proposal is not None:
            out[f"{prefix}proposal_ess_frac"] = float(self.proposal.ess_frac)
        return out

    def summary(self) -> str:
        """A readable table: estimates in nats and bits, then weight diagnostics, warnings."""
        head = table_head(self.delta.level)
        lines = [
            f"isdelta tokens: {self.n_prompts} prompts, {self.n_rows} rows; method={self.method}; prompts={self.prompts}",
            f"control variate: {self.beta}",
            "",
            head,
            "-" * (len(head) + 14),
            *(_row(_LABELS[name], getattr(self, name)) for name in TOKEN_ESTIMATES),
            "",
            f"mean length {self.mean_length0:.2f} tokens under p0, {self.mean_length1:.2f} estimated under p1",
            (
                f"prefix-weight ESS: min {self.prefix_ess_min:.1f} "
                f"(ESS/G {self.prefix_ess_frac_min:.3f}); max |log ρ| {self.max_log_rho:.3g}; "
                f"mean r per prompt in [{self.mean_ratio_min:.4g}, {self.mean_ratio_max:.4g}]; "
                f"rows with L = 0: {self.n_empty}"
            ),
            *([] if self.proposal is None else [str(self.proposal)]),
        ]
        if self.warnings:
            lines += ["", "warnings:", *(f"  - {w}" for w in self.warnings)]
        return "\n".join(lines)
