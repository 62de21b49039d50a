"""The estimates of ``estimate`` from per-prompt sums, in two passes over blocks of prompts.

H0, H1 and ΔH, per sequence and per token, plain (f = −S) and Rao–Blackwellised (f = the
entropy sums) are each a ratio of prompt averages (:mod:`isdelta.estimators.uncertainty`):

    R = Σ_p a_p / Σ_p b_p,   a_p = Σ_{i∈p} w_i f_i,   b_p = Σ_{i∈p} w_i g_i (g ≡ 1 or L),
    ψ_i = r̃_i (e_i − ē_p) / B,   e_i = f_i − R g_i,   ē_p = a_p − R b_p,   B = mean_p b_p,

with w the H0 weights u (1/G_p, or v̄ ∝ p0/q) or the H1 weights w̄, r̃ = G_p w, and ΔH's paired
ψ = ψ(H1) − ψ(H0). The SE reads only Σ_{i∈p} ψ_i² and Σ_{i∈p} ψ_i (``prompts="fixed"``) or ē_p / B
(``"sampled"``). One estimate at a time (``weighted_ratio`` + ``standard_error``, the naive
equivalent the tests compare with) that is ~80 memory-bound passes over [N] arrays, most of
``estimate``'s time at N = 10^6. Here, over blocks of ~2^15 rows (``Groups.blocks``: a block's
arrays stay in the CPU cache, and its temporaries go to reused ``Groups.scratch`` buffers):

- pass 1, :func:`row_sums`: every per-prompt sum that needs no global value, at once: the a_p and
  b_p (Σ w L once per weight vector: both rates share it), ``diagnose``'s row means, and ΔH₁'s
  within-prompt covariance with its Σψ², Σψ (rows from p0);
- pass 2: ψ of H0 and H1 (R, ē_p and B from pass 1), then ΔH's ψ in place of H1's, each
  reduced at once to Σψ² and Σψ; no [N] ψ is kept. Per-prompt terms broadcast over [P, G]
  views when every G_p is equal.

Plain estimates are those of f = S with the value negated: negation is exact in floating point
and the SE does not see it, so no −S array is made. With p1 = p0 (w̄ = u bit for bit), H1 and
H0 go through the same operations: ΔH = 0 and its SE = 0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isdelta.estimators.groups import Groups
from isdelta.estimators.inputs import Rows
from isdelta.estimators.results import Estimate
from isdelta.estimators.uncertainty import fixed_standard_error

__all__ = ["block_rows", "first_order", "ratio_estimates", "row_sums"]

NAMES = ("h0", "h1", "delta")


def block_rows(x: np.ndarray | None, rs: slice, bg: Groups) -> np.ndarray | float:
    """Rows ``rs`` of a sorted [N] array shaped for the block ``bg`` (:meth:`Groups.shaped`);
    ``x`` None stands for the uniform weights 1/G_p: a [p, 1] or [n] broadcast, or the float
    1/G when the block's prompts are equal (the same floats as ``Groups.uniform``, no [N] array)."""
    if x is not None:
        return bg.shaped(x[rs])
    if bg.equal_sizes:
        return 1.0 / float(bg.sizes[0])
    return bg.per_row(1.0 / bg.sizes)


@dataclass(frozen=True)
class _Ratio:
    """One ratio after pass 1: R, ē_p [P] and B (1.0 for a prompt average, g ≡ 1)."""

    value: float
    e_bar: np.ndarray
    big_b: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray | None) -> _Ratio:
        """From a_p and b_p (None: g ≡ 1), as ``weighted_ratio`` computes them."""
        big_b = 1.0 if b is None else b.mean()
        value = a.mean() / big_b
        return cls(value, a - value if b is None else a - value * b, big_b)

    def psi(self, out: np.ndarray, x: np.ndarray, length, ps: slice, bg: Groups, r_tilde) -> np.ndarray:
        """ψ of the prompts ``ps``, written into ``out``: r̃ (e − ē_p)/B, with e − ē_p = x − (R + ē_p)
        for a prompt average (``length`` None) and (x − R L) − ē_p for a rate; ``x``, ``length``
        block rows, ``r_tilde`` r̃/B as :func:`block_rows` gives weights."""
        if length is None:  # a prompt average: one pass (R + ē_p is a_p up to rounding)
            np.subtract(x, bg.per_row(self.value + self.e_bar[ps]), out=out)
        else:
            np.multiply(length, self.value, out=out)
            np.subtract(x, out, out=out)
            out -= bg.per_row(self.e_bar[ps])
        if not (isinstance(r_tilde, float) and r_tilde == 1.0):
            out *= r_tilde
        return out


def row_sums(rows: Rows, w: np.ndarray, u: np.ndarray | None, *, covariance: bool) -> dict:
    """Every per-prompt sum [P] that needs no global value, in one pass over blocks of prompts.

    - ``"u.length"``, ``"u.s0"``, ``"u.ent0"``: Σ_{i∈p} u_i x_i (H0 weights u; None: 1/G_p);
      ``"w.length"``, ``"w.s1"``, ``"w.ent1"``: Σ_{i∈p} w̄_i x_i (the entropy sums when given);
    - ``"u.s0/length"``, ``"w.s1/length"`` and ``"u.stopped"`` (with ``stopped``), and the int
      ``"n_empty"``, rows with L = 0 (where the per-row rates are not finite);
    - with ``covariance`` (rows from p0: u = 1/G_p; δ' = ℓ): ``"cov"`` Σ (S0 − S̄0)(ℓ − ℓ̄) / (G_p − 1),
      ``"cov.sq"``, ``"cov.sum"`` Σψ², Σψ of its influence terms ψ = (S0 − S̄0)(ℓ − ℓ̄) − their
      prompt mean, ``"cov_term"`` Σ (w̄ − 1/G_p)(S0 − S̄0) and ``"kl"`` Σ w̄ ℓ.
    """
    g = rows.groups
    products = {"u.length": (u, rows.length), "u.s0": (u, rows.s0), "w.length": (w, rows.length), "w.s1": (w, rows.s1)}
    if rows.ent0 is not None:
        products |= {"u.ent0": (u, rows.ent0), "w.ent1": (w, rows.ent1)}
    names = [*products, "u.s0/length", "w.s1/length"] + ["u.stopped"] * (rows.stopped is not None)
    names += ["cov", "cov.sq", "cov.sum", "cov_term", "kl"] if covariance else []
    sums: dict = {k: np.empty(g.n_prompts) for k in names} | {"n_empty": 0}
    buf = g.scratch(3)
    for ps, rs, bg in g.blocks:
        tmp = bg.view(buf[0])
        for name, (wk, x) in products.items():
            sums[name][ps] = _dot(block_rows(wk, rs, bg), bg.shaped(x[rs]), tmp, bg)
        length, ub = bg.shaped(rows.length[rs]), block_rows(u, rs, bg)
        sums["n_empty"] += int(np.count_nonzero(length == 0))
        with np.errstate(divide="ignore", invalid="ignore"):  # L = 0: then these are not used
            # S/L rather than −S/L: the sums, then the means, come out negated exactly
            sums["u.s0/length"][ps] = _dot(ub, np.divide(bg.shaped(rows.s0[rs]), length, out=tmp), tmp, bg)
            sums["w.s1/length"][ps] = _dot(
                block_rows(w, rs, bg), np.divide(bg.shaped(rows.s1[rs]), length, out=tmp), tmp, bg
            )
        if rows.stopped is not None:
            sums["u.stopped"][ps] = _dot(ub, ~bg.shaped(rows.stopped[rs]), tmp, bg)
        if covariance:
            _covariance_sums(rows, w, ps, rs, bg, buf, sums)
    return sums


def _dot(a, b, tmp: np.ndarray, bg: Groups) -> np.ndarray:
    """Σ_{i∈p} a_i b_i for the prompts of a block, the product written into ``tmp``."""
    return bg.sum(np.multiply(a, b, out=tmp).reshape(-1))


def _covariance_sums(rows: Rows, w: np.ndarray, ps: slice, rs: slice, bg: Groups, buf: np.ndarray, sums: dict) -> None:
    """The ``covariance`` sums of :func:`row_sums` for one block (``covariance()`` in
    :mod:`uncertainty`, and snis's cov_term and KL, written for a block)."""
    s0, log_r = rows.s0[rs], rows.log_r[rs]
    s0_centred, r_centred, tmp = bg.view(buf[1]), bg.view(buf[2]), bg.view(buf[0])
    np.subtract(bg.shaped(s0), bg.per_row(bg.mean(s0)), out=s0_centred)
    np.subtract(bg.shaped(w[rs]), block_rows(None, rs, bg), out=tmp)
    tmp *= s0_centred  # (w̄ − 1/G_p)(S0 − S̄0)
    sums["cov_term"][ps] = bg.sum(tmp.reshape(-1))
    sums["kl"][ps] = _dot(bg.shaped(w[rs]), bg.shaped(log_r), tmp, bg)
    np.subtract(bg.shaped(log_r), bg.per_row(bg.mean(log_r)), out=r_centred)
    with np.errstate(over="ignore", invalid="ignore"):  # deviations past 1e154: ±inf / nan, as it is
        prod = np.multiply(s0_centred, r_centred, out=tmp).reshape(-1)  # (S0 − S̄0)(ℓ − ℓ̄)
        total = bg.sum(prod)
        sums["cov"][ps] = total / (bg.sizes - 1)
        psi = np.subtract(bg.shaped(prod), bg.per_row(total / bg.sizes), out=s0_centred)
        sums["cov.sq"][ps], sums["cov.sum"][ps] = _reduce(psi, bg)


def ratio_estimates(
    rows: Rows, w: np.ndarray, u: np.ndarray | None, prompts: str, level: float, z: float, sums: dict
) -> dict:
    """h0 … delta_tok and, with entropy sums, their ``_rb`` versions (None without), each an
    :class:`Estimate` with SE and CI; ``w`` the H1 weights w̄, ``u`` the H0 weights (None: 1/G_p),
    [N] sorted rows, ``sums`` from :func:`row_sums`.

    Naive equivalent: for each (f0, f1, g), ``h0 = weighted_ratio(u, f0, g, groups)``,
    ``h1 = weighted_ratio(w, f1, g, groups)``, ``delta = h1 − h0``, each with ``standard_error``.
    """
    g = rows.groups
    pairs = {"": (rows.s0, rows.s1, -1.0)}  # plain: f = −S, the estimates of S negated
    if rows.ent0 is not None:
        pairs["_rb"] = (rows.ent0, rows.ent1, 1.0)
    ratios = {}
    with np.errstate(divide="ignore", invalid="ignore"):  # all rows L = 0: nan rates
        for suffix, (x0, x1) in {"": ("s0", "s1"), "_rb": ("ent0", "ent1")}.items():
            if suffix in pairs:
                a = (sums[f"u.{x0}"], sums[f"w.{x1}"])
                ratios[suffix, ""] = tuple(_Ratio.of(a_k, None) for a_k in a)
                ratios[suffix, "_tok"] = tuple(_Ratio.of(a_k, sums[f"{k}.length"]) for a_k, k in zip(a, "uw"))
    # (suffix, tok) -> [3 (h0, h1, Δ), 2 (Σψ², Σψ), P]; the sampled SE needs only ē_p
    psi_sums = _pass2(rows, (u, w), pairs, ratios) if prompts == "fixed" else {}
    out: dict = {f"{n}{tok}_rb": None for n in NAMES for tok in ("", "_tok")}
    with np.errstate(over="ignore", invalid="ignore"):  # a ψ past 1e154: a nan SE, which readers check
        for (suffix, tok), (r0, r1) in ratios.items():
            values = (r0.value, r1.value, r1.value - r0.value)
            for k, name in enumerate(NAMES):
                if prompts == "sampled":
                    zs = (r0.e_bar / r0.big_b, r1.e_bar / r1.big_b)
                    z_p = zs[k] if k < 2 else zs[1] - zs[0]
                    se = float(np.std(z_p, ddof=1) / np.sqrt(g.n_prompts))
                else:
                    se = fixed_standard_error(*psi_sums[suffix, tok][k], g.sizes)
                out[f"{name}{tok}{suffix}"] = Estimate.normal(pairs[suffix][2] * float(values[k]), se, level, z)
    return out


def _pass2(rows: Rows, weights: tuple, pairs: dict, ratios: dict) -> dict:
    """Σ_{i∈p} ψ_i² and Σ_{i∈p} ψ_i of H0, H1 and ΔH for each (suffix, tok), block by block."""
    g = rows.groups
    sums = {key: np.empty((3, 2, g.n_prompts)) for key in ratios}
    big_b = [ratios[next(iter(pairs)), "_tok"][k].big_b for k in (0, 1)]  # B of the rates, per weights
    buf = g.scratch(6)  # ψ0, ψ1, r̃ and r̃/B of both weights
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for ps, rs, bg in g.blocks:
            length = bg.shaped(rows.length[rs])
            g_p = float(bg.sizes[0]) if bg.equal_sizes else bg.per_row(bg.sizes.astype(np.float64))
            r_tilde, r_rate = [], []
            for k, wk in enumerate(weights):
                wb = block_rows(wk, rs, bg)
                if isinstance(wb, float):  # 1/G: r̃ = 1/G·G, a float too
                    r_tilde.append(wb * g_p)
                    r_rate.append(wb * g_p / big_b[k])
                else:  # r̃ = G_p w, and r̃/B shared by both rates
                    r_tilde.append(np.multiply(wb, g_p, out=bg.view(buf[2 + k])))
                    r_rate.append(np.divide(r_tilde[k], big_b[k], out=bg.view(buf[4 + k])))
            psi0, psi1 = bg.view(buf[0]), bg.view(buf[1])
            for (suffix, tok), (r0, r1) in ratios.items():
                x0, x1 = (bg.shaped(x[rs]) for x in pairs[suffix][:2])
                rt, ln = (r_rate, length) if tok else (r_tilde, None)
                r0.psi(psi0, x0, ln, ps, bg, rt[0])
                r1.psi(psi1, x1, ln, ps, bg, rt[1])
                out = sums[suffix, tok]  # [3, 2, P]
                out[0, :, ps] = _reduce(psi0, bg)
                out[1, :, ps] = _reduce(psi1, bg)
                psi1 -= psi0  # ΔH's paired ψ
                out[2, :, ps] = _reduce(psi1, bg)
    return sums


def _reduce(psi: np.ndarray, bg: Groups) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_{i∈p} ψ_i², Σ_{i∈p} ψ_i) for the prompts of a block."""
    flat = psi.reshape(-1)
    return (np.einsum("pg,pg->p", psi, psi) if psi.ndim == 2 else bg.sum(flat * flat)), bg.sum(flat)


def first_order(sums: dict, groups: Groups, prompts: str, level: float, z: float) -> dict:
    """ΔH₁ = −(1/P) Σ_p Cov_p(S0, ℓ) with its SE, cov_term and kl_term (as ``EntropyDelta`` names
    them), from the ``covariance`` sums of :func:`row_sums` (rows from p0 whose counted log-ratio
    δ' is ℓ itself: every term lies within one prompt).

    Naive equivalent: ``covariance(S0, ℓ, groups)`` negated, with ``standard_error``;
    cov_term = −mean_p Σ_{i∈p} (w̄_i − 1/G_p)(S0_i − S̄0_p), kl_term = −mean_p Σ_{i∈p} w̄_i ℓ_i.
    """
    cov_p = sums["cov"]
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(cov_p.mean())
        if prompts == "sampled":
            se = float(np.std(cov_p - value, ddof=1) / np.sqrt(groups.n_prompts))
        else:
            se = fixed_standard_error(sums["cov.sq"], sums["cov.sum"], groups.sizes)
    return {"delta1": Estimate.normal(-value, se, level, z), "cov_term": float(-sums["cov_term"].mean()),
            "kl_term": float(-sums["kl"].mean())}  # fmt: skip
