"""The result of :func:`isdelta.estimators.estimate_tokens`: ``TokenDelta`` (per-decision ΔH)."""

from __future__ import annotations

from dataclasses import dataclass

from isdelta.estimators.result import Estimate, _row, fields_to_dict, table_head

__all__ = ["TokenDelta"]

ESTIMATES = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok", "direct", "path_shift")
_LABELS = {
    "h0": "H0 (sequence)",
    "h1": "H1 (sequence)",
    "delta": "ΔH (sequence)",
    "h0_tok": "H0 / token",
    "h1_tok": "H1 / token",
    "delta_tok": "ΔH / token",
    "direct": "  direct (p0 paths)",
    "path_shift": "  path shift",
}


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

    def to_dict(self) -> dict:
        """All fields, Estimates as nested dicts (nats and ``_bits``); JSON-safe."""
        return fields_to_dict(self)

    def scalars(self, prefix: str = "entropy_tokens/") -> dict[str, float]:
        """Flat {name: float} for a metrics logger: each estimate and its SE (nats), and the
        weight diagnostics; non-finite values become nan."""
        out = {}
        for name in ESTIMATES:
            est = getattr(self, name)
            out[f"{prefix}{name}"] = est.value
            out[f"{prefix}{name}_se"] = est.se
        for name in ("prefix_ess_frac_min", "max_log_rho", "mean_length0", "mean_length1"):
            out[f"{prefix}{name}"] = float(getattr(self, name))
        return out

    def summary(self) -> str:
        """A readable table: estimates in nats and bits, then weight diagnostics, warnings."""
        head = table_head(self.delta.level)
        lines = [
            (
                f"isdelta tokens: {self.n_prompts} prompts, {self.n_rows} rows; "
                f"method={self.method}; prompts={self.prompts}"
            ),
            f"control variate: {self.beta}",
            "",
            head,
            "-" * (len(head) + 14),
            *(_row(_LABELS[name], getattr(self, name)) for name in ESTIMATES),
            "",
            (
                f"mean length {self.mean_length0:.2f} tokens under p0, "
                f"{self.mean_length1:.2f} estimated under p1"
            ),
            (
                f"prefix-weight ESS: min {self.prefix_ess_min:.1f} "
                f"(ESS/G {self.prefix_ess_frac_min:.3f}); max |log ρ| {self.max_log_rho:.3g}; "
                f"mean r per prompt in [{self.mean_ratio_min:.4g}, {self.mean_ratio_max:.4g}]; "
                f"rows with L = 0: {self.n_empty}"
            ),
        ]
        if self.warnings:
            lines += ["", "warnings:", *(f"  - {w}" for w in self.warnings)]
        return "\n".join(lines)
