"""Several models on one corpus: rank correlations, distances and a PCA (numpy + scipy only).

Input is one per-text statistic per model, X [M, n] (models on the first axis, texts on the
last), restricted to the texts every model scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from isdelta.outputs import finite_or_none

__all__ = ["PCA", "Comparison", "compare_models", "distance_matrix", "pca"]


@dataclass(frozen=True)
class PCA:
    """PCA of the models' per-text vectors: the models are the points, the texts the axes.

    Attributes
    ----------
    coords : float [M, k]
        Each model's coordinates on the principal axes (k = min(M − 1, n) components, at least 1).
    explained_variance : float [k]
        Variance along each axis (divided by M − 1; zero for M = 1).
    explained_variance_ratio : float [k]
        The same as a fraction of the total (NaN when all models coincide).
    text_loadings : float [k, n]
        The axes in text space: where a component weighs texts most, models differ most.
    """

    coords: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    text_loadings: np.ndarray

    def to_dict(self, names: list[str]) -> dict[str, Any]:
        return {
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": [finite_or_none(r) for r in self.explained_variance_ratio],
            "coords": {n: c.tolist() for n, c in zip(names, self.coords)},
        }


def pca(X: np.ndarray) -> PCA:
    """PCA by SVD of the model-centred matrix X [M, n]: X − mean_models = U S Vᵀ.

    Naive equivalent: the eigen-decomposition of the M × M Gram matrix of the centred rows
    (coords = eigenvectors · √eigenvalues); SVD avoids forming it.
    """
    X = np.asarray(X, dtype=np.float64)
    M = X.shape[0]
    Xc = X - X.mean(0, keepdims=True)  # [M, n]: centre each text's values over the models
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)  # U [M, k], S [k], Vt [k, n]
    k = max(1, min(M - 1, Xc.shape[1]))  # centring M points leaves at most M - 1 axes
    U, S, Vt = U[:, :k], S[:k], Vt[:k]
    # fix the sign of each axis (SVD's is arbitrary) so reruns and plots agree: largest loading > 0
    sign = np.sign(Vt[np.arange(len(S)), np.abs(Vt).argmax(1)]) if Vt.size else np.ones(len(S))
    sign[sign == 0] = 1.0
    U, Vt = U * sign, Vt * sign[:, None]
    var = S**2 / max(M - 1, 1)
    total = var.sum()
    ratio = var / total if total > 0 else np.full_like(var, np.nan)
    return PCA(U * S, var, ratio, Vt)


def _rank_matrix(X: np.ndarray, kind: Literal["spearman", "kendall"]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise rank correlations [M, M] and their p-values (diagonal: 1 and 0)."""
    from scipy import stats

    M = X.shape[0]
    rho, p = np.eye(M), np.zeros((M, M))
    fn = stats.spearmanr if kind == "spearman" else stats.kendalltau
    for a in range(M):
        for b in range(a + 1, M):
            r = fn(X[a], X[b])
            rho[a, b] = rho[b, a] = float(r.statistic)
            p[a, b] = p[b, a] = float(r.pvalue)
    return rho, p


def distance_matrix(
    X: np.ndarray,
    metric: Literal["rmse", "mean_abs", "one_minus_spearman"] = "rmse",
    spearman: np.ndarray | None = None,
) -> np.ndarray:
    """Distances [M, M] between the models' per-text vectors (zero on the diagonal).

    ``rmse`` = √mean_t (x_a − x_b)², ``mean_abs`` = mean_t |x_a − x_b| (both in the statistic's
    unit), ``one_minus_spearman`` = 1 − ρ_s (0 when the two models order the texts alike).
    """
    X = np.asarray(X, dtype=np.float64)
    if metric == "one_minus_spearman":
        rho = spearman if spearman is not None else _rank_matrix(X, "spearman")[0]
        D = 1.0 - rho
    else:
        diff = X[:, None, :] - X[None, :, :]  # [M, M, n]
        D = np.sqrt((diff**2).mean(-1)) if metric == "rmse" else np.abs(diff).mean(-1)
    np.fill_diagonal(D, 0.0)
    return D


@dataclass(frozen=True)
class Comparison:
    """Models compared on one per-text statistic (see :func:`compare_models`)."""

    names: list[str]
    stat: str
    n_texts: int
    spearman: np.ndarray
    spearman_p: np.ndarray
    kendall: np.ndarray
    kendall_p: np.ndarray
    distance: np.ndarray
    metric: str
    pca: PCA

    def to_dict(self) -> dict[str, Any]:
        def mat(a):  # JSON-safe: an undefined correlation (constant values) is null
            return {n: dict(zip(self.names, map(finite_or_none, row))) for n, row in zip(self.names, a)}

        return {
            "stat": self.stat,
            "n_texts": self.n_texts,
            "models": self.names,
            "spearman": mat(self.spearman),
            "spearman_p": mat(self.spearman_p),
            "kendall": mat(self.kendall),
            "kendall_p": mat(self.kendall_p),
            "distance": {"metric": self.metric, "matrix": mat(self.distance)},
            "pca": self.pca.to_dict(self.names),
        }


def compare_models(
    X: np.ndarray, names: list[str], stat: str, metric: Literal["rmse", "mean_abs", "one_minus_spearman"] = "rmse"
) -> Comparison:
    """Rank correlations (Spearman, Kendall τ-b), a distance matrix and a PCA of X [M, n].

    Parameters
    ----------
    X : float array [M, n]
        Per-text statistic of M >= 2 models on the same n >= 3 texts (finite values).
    names : list of str
        Model names, one per row of X.
    stat : str
        The statistic's name (for the record).
    metric : {"rmse", "mean_abs", "one_minus_spearman"}

    References
    ----------
    Kendall, M. G. (1945). The treatment of ties in ranking problems. Biometrika 33(3), 239–251.
    doi:10.1093/biomet/33.3.239
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(names) or X.shape[0] < 2:
        raise ValueError(f"X must be [M, n] with M = len(names) >= 2 models; got {X.shape} for {len(names)} names.")
    if X.shape[1] < 3:
        raise ValueError(
            f"rank correlations need >= 3 texts scored by every model; got {X.shape[1]}. "
            "Score a larger corpus (data.limit)."
        )
    if not np.isfinite(X).all():
        raise ValueError("X holds NaN/inf: keep only the texts every model scored.")
    rho, rho_p = _rank_matrix(X, "spearman")
    tau, tau_p = _rank_matrix(X, "kendall")
    D = distance_matrix(X, metric, spearman=rho)
    return Comparison(list(names), stat, int(X.shape[1]), rho, rho_p, tau, tau_p, D, metric, pca(X))
