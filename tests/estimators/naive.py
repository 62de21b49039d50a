"""Naive reference for ``estimate``: a Python loop over prompts, formulas as written in DESIGN §5-6.

Deliberately written without the vectorised ``Groups`` machinery (one prompt at a time,
scipy's logsumexp, np.cov) so the tests compare two independent implementations.
Raw SNIS weights (``weights="none"``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def _prompts(log_p0, log_p1, length, group):
    """(S0, S1, L, w̄) of each prompt, in sorted-id order."""
    for p in sorted(set(group.tolist())):
        m = group == p
        s0, s1 = log_p0[m], log_p1[m]
        yield s0, s1, length[m], np.exp((s1 - s0) - logsumexp(s1 - s0))


def _rates(prompts) -> tuple[float, float, float, float]:
    """H0_tok, H1_tok and their denominators B0 = mean_p mean L, B1 = mean_p Σ w̄ L."""
    a0 = np.mean([np.mean(-s0) for s0, _, _, _ in prompts])
    b0 = np.mean([np.mean(L) for _, _, L, _ in prompts])
    a1 = np.mean([np.sum(w * -s1) for _, s1, _, w in prompts])
    b1 = np.mean([np.sum(w * L) for _, _, L, w in prompts])
    return a0 / b0, a1 / b1, b0, b1


def _influence(s0, s1, L, w, r0, r1, b0, b1) -> dict[str, np.ndarray]:
    """Per-row influence terms ψ of one prompt (DESIGN §5; ratio estimators linearised)."""
    rt = len(s0) * w  # r̃ = r / mean(r)
    h0_p, h1_p = np.mean(-s0), np.sum(w * -s1)
    psi0_tok = ((-s0 - r0 * L) - (np.mean(-s0) - r0 * np.mean(L))) / b0
    psi1_tok = rt * ((-s1 - r1 * L) - (np.sum(w * -s1) - r1 * np.sum(w * L))) / b1
    u = (s0 - s0.mean()) * ((s1 - s0) - (s1 - s0).mean())
    return {
        "h0": -s0 - h0_p,
        "h1": rt * (-s1 - h1_p),
        "delta": rt * (-s1 - h1_p) - (-s0 - h0_p),  # the paired influence function
        "h0_tok": psi0_tok,
        "h1_tok": psi1_tok,
        "delta_tok": psi1_tok - psi0_tok,
        "delta1": -(u - u.mean()),
    }


def naive(log_p0, log_p1, length, group) -> dict:
    """Values, fixed- and sampled-mode SEs, ESS, KL, ΔH₁ and the decomposition terms."""
    prompts = list(_prompts(log_p0, log_p1, length, group))
    n_p = len(prompts)
    r0, r1, b0, b1 = _rates(prompts)
    var: dict[str, float] = {}
    per: dict[str, list] = {k: [] for k in ("h0", "h1", "z_tok", "cov", "kl", "ess", "cov_t")}
    for s0, s1, L, w in prompts:
        for k, psi in _influence(s0, s1, L, w, r0, r1, b0, b1).items():
            var[k] = var.get(k, 0.0) + np.var(psi, ddof=1) / len(s0)
        d, rt = s1 - s0, len(s0) * w
        per["h0"].append(np.mean(-s0))
        per["h1"].append(np.sum(w * -s1))
        z1 = (np.sum(w * -s1) - r1 * np.sum(w * L)) / b1
        per["z_tok"].append(z1 - (np.mean(-s0) - r0 * np.mean(L)) / b0)
        per["cov"].append(np.cov(s0, d, ddof=1)[0, 1])
        per["kl"].append(np.sum(w * d))
        per["ess"].append(1.0 / np.sum(w**2))
        per["cov_t"].append(-np.mean((rt - 1) * (s0 - s0.mean())))
    delta_p = np.subtract(per["h1"], per["h0"])
    return {
        "h0": np.mean(per["h0"]),
        "h1": np.mean(per["h1"]),
        "delta": np.mean(per["h1"]) - np.mean(per["h0"]),
        "h0_tok": r0,
        "h1_tok": r1,
        "delta_tok": r1 - r0,
        "delta1": -np.mean(per["cov"]),
        "kl": np.mean(per["kl"]),
        "kl_term": -np.mean(per["kl"]),
        "cov_term": np.mean(per["cov_t"]),
        "ess_min": np.min(per["ess"]),
        "ess": n_p**2 / np.sum(1.0 / np.asarray(per["ess"])),
        "se_fixed": {k: np.sqrt(v) / n_p for k, v in var.items()},
        "se_sampled": {
            "delta": np.std(delta_p, ddof=1) / np.sqrt(n_p),
            "h0": np.std(per["h0"], ddof=1) / np.sqrt(n_p),
            "delta_tok": np.std(per["z_tok"], ddof=1) / np.sqrt(n_p),
            "delta1": np.std(per["cov"], ddof=1) / np.sqrt(n_p),
        },
    }
