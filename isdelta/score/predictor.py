"""Entropy as a predictor of an outcome: logistic regressions and correlation matrices (numpy,
scipy and statsmodels; never torch).

One row per text: a binary outcome y (a corpus label, or whether the model's own answer was
right) and the text's per-text statistics (:data:`isdelta.score.stats.STATS`). For each model of
:func:`model_specs` — entropy alone, entropy + varentropy, entropy + √varentropy, each once
aggregated over the text's positions (``*_mean``) and once at the last token only — it fits

    logit P(y = 1 | x) = β0 + Σ_j βj x_j

by maximum likelihood (``statsmodels.api.Logit``) and reports β, SE, z, p, the 95% CI, AUC
(in-sample, of the fitted probabilities) and the likelihood-ratio test against the
intercept-only model (LR = 2 (ℓ − ℓ0) ~ χ²_k). √varentropy is in nats like the entropy, so
H + √V adds a term in the same unit; V (nats²) weighs long-tailed distributions more.

Coefficients are per nat (per nat² for V): a one-nat rise of the mean entropy multiplies the
odds of y = 1 by exp(β).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from isdelta.outputs import finite_or_none

__all__ = [
    "MIN_PER_CLASS",
    "MIN_TEXTS",
    "LogitFit",
    "PredictorInputError",
    "analyse",
    "auc",
    "check_outcome",
    "correlation_groups",
    "correlations",
    "fit_logit",
    "fits_csv",
    "model_specs",
    "parse_label",
    "regressors",
]

MIN_TEXTS = 10  # fewer texts than this: no fit is worth reporting
MIN_PER_CLASS = 2  # each outcome at least this often (one of a class is separated by any regressor)
_CERTAIN = 1e-6  # a fitted probability this close to 0 or 1 on its own outcome: (quasi-)separation


class PredictorInputError(ValueError):
    """Outcomes that cannot support a logistic fit (too few texts, one class); says the fix."""


def model_specs(last: Literal["entropy_last", "entropy_next"] = "entropy_last") -> dict[str, list[str]]:
    """The regressions fitted: name → regressor columns (see :func:`regressors`).

    ``last`` names the last-token distribution: the one that predicts the text's last token
    (``entropy_last``), or the one after the whole text (``entropy_next``: for a prompt, the
    distribution of the answer's first token).
    """
    v_last = "varentropy_last" if last == "entropy_last" else "varentropy_next"
    return {
        "H_mean": ["entropy_mean"],
        "H_last": [last],
        "H_mean+V_mean": ["entropy_mean", "varentropy_mean"],
        "H_mean+sqrtV_mean": ["entropy_mean", "sqrt_varentropy_mean"],
        "H_last+V_last": [last, v_last],
        "H_last+sqrtV_last": [last, f"sqrt_{v_last}"],
    }


def correlation_groups(last: Literal["entropy_last", "entropy_next"] = "entropy_last") -> dict[str, list[str]]:
    """The per-text statistics whose correlation matrices are reported (the outcome is added)."""
    tail = ["entropy_last", "varentropy_last", "entropy_next", "varentropy_next"]
    return {
        "aggregated": ["entropy_mean", "varentropy_mean", "nll_mean", "n_tokens"],
        "last": tail if last == "entropy_last" else tail[2:] + tail[:2],
    }


def regressors(cols: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Columns [n, k] (float64) by name; ``sqrt_X`` is √X (a varentropy is ≥ 0)."""
    out = []
    for n in names:
        x = np.asarray(cols[n.removeprefix("sqrt_")], dtype=np.float64)
        out.append(np.sqrt(np.clip(x, 0.0, None)) if n.startswith("sqrt_") else x)
    return np.stack(out, axis=1)


def parse_label(value: Any) -> float | None:
    """A label as 1.0 / 0.0, None when missing (``null``); ValueError for anything else.

    Accepted: true/false, 1/0 (int or float), and the strings "true", "false", "1", "0".
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return float(value.strip().lower() in ("true", "1"))
    raise ValueError(f"expected 0/1 or true/false (or null for unknown); got {value!r}")


def check_outcome(y: np.ndarray, what: str = "the outcome") -> None:
    """PredictorInputError unless y (0/1, NaN = unknown) has enough texts of both classes."""
    y = np.asarray(y, dtype=np.float64)
    known = y[np.isfinite(y)]
    n1 = int((known == 1).sum())
    n0 = len(known) - n1
    if len(known) < MIN_TEXTS:
        raise PredictorInputError(
            f"{what}: {len(known)} texts with a known outcome (of {len(y)}); a logistic fit needs "
            f"≥ {MIN_TEXTS}. Score a larger corpus (data.limit) or label more texts."
        )
    if min(n0, n1) < MIN_PER_CLASS:
        only = "1 (true)" if n0 < n1 else "0 (false)"
        raise PredictorInputError(
            f"{what}: {n1} texts have outcome 1 and {n0} outcome 0 — nearly all are {only}, so "
            f"there is nothing to predict (each class needs ≥ {MIN_PER_CLASS}). Use a corpus "
            "with both outcomes, or (predictor.outcome: answer) easier or harder prompts."
        )


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a y=1 text > score of a y=0 text), ties count ½.

    The Mann–Whitney U of the positives over the negatives divided by n1·n0 (scipy's U, with
    mid-ranks for ties). Naive equivalent: ``mean([(a > b) + 0.5 (a == b) for a in pos for b in neg])``.
    """
    from scipy.stats import mannwhitneyu

    y = np.asarray(y)
    pos, neg = np.asarray(score)[y == 1], np.asarray(score)[y == 0]
    if not len(pos) or not len(neg):
        raise PredictorInputError("AUC needs texts of both outcomes.")
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


@dataclass(frozen=True)
class LogitFit:
    """One logistic regression of the outcome on some per-text statistics.

    ``status`` is "ok", "separated" (some texts' outcome is predicted with certainty: the
    maximum-likelihood estimate does not exist, so β, SE and p are left out — the regressors
    separate the classes, AUC says how well), "no convergence" or "failed" (``note`` says why).
    Coefficient dicts include ``const``; values are None where undefined, never NaN.
    """

    name: str
    terms: list[str]
    n: int
    n_pos: int
    status: str
    note: str = ""
    coef: dict[str, float | None] = field(default_factory=dict)
    se: dict[str, float | None] = field(default_factory=dict)
    z: dict[str, float | None] = field(default_factory=dict)
    p: dict[str, float | None] = field(default_factory=dict)
    ci_low: dict[str, float | None] = field(default_factory=dict)
    ci_high: dict[str, float | None] = field(default_factory=dict)
    llf: float | None = None
    llnull: float | None = None
    lr_stat: float | None = None
    lr_df: int = 0
    lr_p: float | None = None
    aic: float | None = None
    pseudo_r2: float | None = None
    auc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named(names: list[str], values) -> dict[str, float | None]:
    return {n: finite_or_none(float(v)) for n, v in zip(names, np.asarray(values, dtype=np.float64))}


def fit_logit(
    y: np.ndarray,
    X: np.ndarray,
    terms: list[str],
    name: str = "",
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> LogitFit:
    """Fit ``logit P(y=1) = β0 + X β`` with statsmodels and summarise it.

    Parameters
    ----------
    y : float array [n]
        0/1 outcomes (finite; filter unknown ones first). Checked by :func:`check_outcome`.
    X : float array [n, k]
        Regressors (finite), without the constant (added here).
    terms : list of str
        Column names of X.
    name : str
        The model's name (for the record).
    level : float
        Confidence level of ``ci_low`` / ``ci_high``.
    clusters : array [n], optional
        A cluster label per text (e.g. the prompt several answers share): SE, z, p and the
        intervals are then cluster-robust (statsmodels ``cov_type="cluster"``, the sandwich
        estimator summed over clusters), since texts of one cluster are not independent. The
        likelihood-ratio test and AIC stay likelihood-based (they assume independent texts).

    Returns
    -------
    LogitFit

    References
    ----------
    Albert, A. and Anderson, J. A. (1984). On the existence of maximum likelihood estimates in
    logistic regression models. Biometrika 71(1), 1–10. doi:10.1093/biomet/71.1.1
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationError, PerfectSeparationWarning

    y = np.asarray(y, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64).reshape(len(y), -1)  # [n, k]
    check_outcome(y)
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("fit_logit: y and X must be finite; drop texts without a score or an outcome first.")
    base = {"name": name, "terms": list(terms), "n": len(y), "n_pos": int(y.sum())}
    cols = ["const", *terms]
    if np.any(X.std(0) == 0):
        const = [t for t, s in zip(terms, X.std(0)) if s == 0]
        return LogitFit(**base, status="failed", note=f"{const} is the same for every text: nothing to fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cov = {} if clusters is None else {"cov_type": "cluster", "cov_kwds": {"groups": _codes(clusters)}}
            res = sm.Logit(y, sm.add_constant(X, has_constant="add")).fit(method="newton", maxiter=100, disp=0, **cov)
        except PerfectSeparationError:
            return _separated(base, y, None)
        except np.linalg.LinAlgError as e:
            return LogitFit(**base, status="failed", note=f"singular information matrix ({e}): collinear regressors")
    kinds = {w.category for w in caught}
    prob = np.asarray(res.predict(), dtype=np.float64)
    certain = ((y == 1) & (prob > 1 - _CERTAIN)) | ((y == 0) & (prob < _CERTAIN))
    if PerfectSeparationWarning in kinds or certain.any():
        return _separated(base, y, prob, int(certain.sum()))
    ci = np.asarray(res.conf_int(alpha=1 - level))  # [k + 1, 2]
    ok = bool(res.mle_retvals.get("converged", True)) and ConvergenceWarning not in kinds
    return LogitFit(
        **base,
        status="ok" if ok else "no convergence",
        note="" if ok else "Newton iterations did not converge in 100 steps: read the numbers with care",
        coef=_named(cols, res.params),
        se=_named(cols, res.bse),
        z=_named(cols, res.tvalues),
        p=_named(cols, res.pvalues),
        ci_low=_named(cols, ci[:, 0]),
        ci_high=_named(cols, ci[:, 1]),
        llf=float(res.llf),
        llnull=float(res.llnull),
        lr_stat=float(res.llr),
        lr_df=int(res.df_model),
        lr_p=float(res.llr_pvalue),
        aic=float(res.aic),
        pseudo_r2=float(res.prsquared),
        auc=auc(prob, y),
    )


def _codes(clusters) -> np.ndarray:
    """Integer codes [n] of any cluster labels (statsmodels wants integers)."""
    return np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)[1]


def _separated(base: dict, y: np.ndarray, prob: np.ndarray | None, n_certain: int = 0) -> LogitFit:
    """The record of a fit whose MLE does not exist (AUC from the diverging fit's probabilities)."""
    note = (
        "perfect separation: the regressors split the texts into outcome 0 and outcome 1"
        + (f" ({n_certain} texts predicted with certainty)" if n_certain else "")
        + ", so the maximum-likelihood coefficients are infinite and no SE or p-value exists; "
        "more texts, or a penalised fit, would give finite ones"
    )
    a = auc(prob, y) if prob is not None and np.isfinite(prob).all() else None
    return LogitFit(**base, status="separated", note=note, auc=a)


def correlations(cols: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Pearson and Spearman correlation matrices of per-text columns (finite rows only).

    Returns ``{"pearson": {a: {b: r}}, "spearman": ...}``; a constant column has no correlation
    (None, never NaN). Spearman's ρ is Pearson's r of the mid-ranks (scipy.stats.spearmanr).
    """
    from scipy import stats

    names = list(cols)
    X = np.stack([np.asarray(cols[n], dtype=np.float64) for n in names], axis=1)  # [n, k]
    X = X[np.isfinite(X).all(1)]
    out: dict[str, dict[str, dict[str, float | None]]] = {"pearson": {}, "spearman": {}}
    for kind, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        mat = {a: {b: None for b in names} for a in names}
        for i, a in enumerate(names):
            for j in range(i, len(names)):
                x, z = X[:, i], X[:, j]
                r = None
                if len(x) >= 3 and x.std() > 0 and z.std() > 0:
                    r = 1.0 if i == j else finite_or_none(float(fn(x, z).statistic))
                mat[a][names[j]] = mat[names[j]][a] = r
        out[kind] = mat
    return out


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate k/n (for the plot's bin rates)."""
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    return mid - half, mid + half


def analyse(
    y: np.ndarray,
    cols: dict[str, np.ndarray],
    specs: dict[str, list[str]],
    groups: dict[str, list[str]],
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every fit of ``specs`` and the correlation matrices of ``groups`` (plus the outcome).

    Parameters
    ----------
    y : float array [n]
        1.0 / 0.0 per text, NaN where unknown.
    cols : dict of float arrays [n]
        Per-text statistics (NaN for a text with no scored token).
    specs : dict
        :func:`model_specs`.
    groups : dict
        :func:`correlation_groups`.
    level : float
        Confidence level of the coefficient intervals.
    clusters : array [n], optional
        A cluster label per text: cluster-robust SEs (:func:`fit_logit`).

    Returns
    -------
    dict
        Counts (``n_texts``, ``n_used``, ``n_positive``, ``n_no_outcome``, ``n_unscored``),
        ``fits`` (one :meth:`LogitFit.to_dict` per spec) and ``correlations``
        (``{group: {"pearson": …, "spearman": …}}``). JSON-safe: no NaN.
    """
    y = np.asarray(y, dtype=np.float64)
    names = {t for terms in [*specs.values(), *groups.values()] for t in terms}
    scored = np.logical_and.reduce([np.isfinite(cols[t.removeprefix("sqrt_")]) for t in names])
    keep = np.isfinite(y) & scored
    check_outcome(y[keep], "the outcome (texts with a score and a known outcome)")
    yk = y[keep]
    ck = {k: np.asarray(v, dtype=np.float64)[keep] for k, v in cols.items()}
    cl = None if clusters is None else np.asarray([str(c) for c in clusters], dtype=object)[keep]
    fits = [fit_logit(yk, regressors(ck, terms), terms, name, level, cl).to_dict() for name, terms in specs.items()]
    corr = {g: correlations({**{t: ck[t] for t in terms}, "outcome": yk}) for g, terms in groups.items()}
    return {
        "n_texts": len(y),
        "n_used": int(keep.sum()),
        "n_positive": int(yk.sum()),
        "n_no_outcome": int((~np.isfinite(y)).sum()),
        "n_unscored": int((np.isfinite(y) & ~scored).sum()),
        "level": level,
        "se": "ordinary" if cl is None else f"cluster-robust over {len(set(cl))} clusters",
        "fits": fits,
        "correlations": corr,
    }


def fits_csv(fits: list[dict]) -> str:
    """predictor.csv: one row per (model, coefficient), model-level figures repeated on each row.

    A fit without coefficients (separated, failed) has one row with empty coefficient cells and
    its status and note.
    """
    import csv
    import io

    cols = ["model", "term", "coef", "se", "z", "p", "ci_low", "ci_high"]
    per_model = ["n", "n_pos", "auc", "lr_stat", "lr_df", "lr_p", "pseudo_r2", "aic", "llf", "llnull", "status", "note"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + per_model)
    for f in fits:
        tail = ["" if f[k] is None else f[k] for k in per_model]
        terms = list(f["coef"]) or [""]
        for t in terms:
            w.writerow([f["name"], t] + ["" if f[c].get(t) is None else f[c][t] for c in cols[2:]] + tail)
    return buf.getvalue()
