"""Which numbers the run's reports may print: no impossible number is printed as a number.

A figure is shown only when it is finite, inside the physical bounds of entropy, and its method
passed the headline policy's checks (DESIGN.md §5.4); otherwise the reports print
``n/a (reason)``. The bounds, with V the support of a next-token distribution (the vocabulary,
or top-k) and M = ``sampling.max_new_tokens`` (no completion is longer):

- per token: 0 ≤ H ≤ ln V, so −H0_tok ≤ ΔH_tok ≤ ln V − H0_tok;
- per sequence: 0 ≤ H ≤ M·ln V, so −H0 ≤ ΔH ≤ M·ln V − H0 (and |ΔH₁|, |direct|, |path shift| ≤ M·ln V);
- KL(p1‖p0) ≥ 0.

H(p0), the change of the next-token entropies along p0's own paths (``direct``) and the
first-order prediction ΔH₁ are plain means over p0's samples (q = p0): they need no importance
weight, so a method's rejection does not hide them, only their bounds do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Shown", "na"]

_SEQ = {"h0", "h1", "h0_rb", "h1_rb"}
_TOK = {"h0_tok", "h1_tok", "h0_tok_rb", "h1_tok_rb"}
# means over p0's own samples (direct: the entropies' change along p0's paths; delta1: the first-order
# prediction −Cov_p0(S0, δ)): no importance weights
_UNWEIGHTED = {"h0", "h0_rb", "h0_tok", "h0_tok_rb", "direct", "delta1"}


def _short(check_name: str) -> str:
    """A check's name without its parenthesised detail: "ESS / S (pooled)" -> "ESS / S"."""
    return check_name.split(" (")[0]


@dataclass(frozen=True)
class Shown:
    """The rules for one run: ``log_support`` = ln V, ``max_tokens`` = M, and ``rejected``:
    method -> why the headline policy refused it (absent: it passed); ``rejected_tok``: the same
    for its per-token figures (only the checks that gate the per-token level: a method refused
    per sequence alone still shows its per-token rates)."""

    log_support: float
    max_tokens: int
    rejected: dict[str, str] = field(default_factory=dict)
    rejected_tok: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, decision, support: int, max_tokens: int) -> Shown:
        """From the headline policy's verdict (its checks per method)."""
        rejected, rejected_tok = {}, {}
        for method, checks in decision.checks.items():
            for out, kept in ((rejected, checks), (rejected_tok, [c for c in checks if "per sequence" not in c.name])):
                failed = list(dict.fromkeys(_short(c.name) for c in kept if not c.passed))
                if failed:
                    out[method] = ", ".join(failed)
        if "all" in rejected:  # k̂ > 1: no method survives
            rejected = rejected_tok = {m: rejected["all"] for m in ("cv", "pd", "pd_sn", "snis", "snis_rb")}
        return cls(math.log(support), int(max_tokens), rejected, rejected_tok)

    @property
    def seq_max(self) -> float:
        return self.max_tokens * self.log_support

    def method_reason(self, method: str, per_token: bool = False) -> str | None:
        """Why ``method``'s importance-weighted figures (``per_token``: its per-token ones) are not
        shown (None: they are)."""
        reason = (self.rejected_tok if per_token else self.rejected).get(method)
        return None if reason is None else f"{method} rejected: {reason}"

    def reason(self, key: str, value: float, method: str, h0: float | None = None) -> str | None:
        """Why the estimate ``key`` (``h1``, ``delta_tok``, ...) of ``method`` with point ``value``
        cannot be shown; None when it can. ``h0``: H(p0) in the same unit (for ΔH's lower bound)."""
        if value is None or not math.isfinite(value):
            return "not finite"
        base = key.removesuffix("_rb")
        if key not in _UNWEIGHTED and (why := self.method_reason(method, base.endswith("_tok"))):
            return why
        top = self.log_support if base.endswith("_tok") else self.seq_max
        if key in _SEQ | _TOK:
            if value < 0:
                return "negative entropy"
            if value > top:
                return f"above {'ln V' if base.endswith('_tok') else 'M·ln V'} = {top:.4g}"
            return None
        if base in ("delta", "delta_tok") and h0 is not None and math.isfinite(h0):
            if value < -h0:
                return f"below −H(p0) = {-h0:.4g}"
            if value > top - h0:
                return f"above the largest possible change {top - h0:.4g}"
            return None
        return f"|value| above {top:.4g}" if abs(value) > top else None

    def kl(self, value: float) -> str | None:
        """Why a KL estimate cannot be shown (None: it can)."""
        if not math.isfinite(value):
            return "not finite"
        return "negative: KL ≥ 0 always, these weights are too few or too uneven" if value < 0 else None


def na(reason: str) -> str:
    """The text printed in place of a number."""
    return f"n/a ({reason})"
