"""Fixtures for the estimator tests: a seeded rng, random SNIS rows, the enumerable toy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# toy.py and naive.py live beside the tests (reusable by benchmarks); make them importable
# whatever the rootdir / import mode pytest runs with.
sys.path.insert(0, str(Path(__file__).parent))

from toy import TabularToy


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator per test: results never depend on test order."""
    return np.random.default_rng(20240611)


def random_rows(
    rng: np.random.Generator, sizes: list[int], *, step: float = 0.3, labels: list | None = None, shuffle: bool = True
) -> dict[str, np.ndarray]:
    """Plausible scored rows: ragged prompts of ``sizes`` rows, shuffled, arbitrary labels.

    S0 = −(gamma total NLL), S1 = S0 + a correlated perturbation (so ΔH ≠ 0 and the
    covariance term matters), L ≥ 1, entropy sums near −S.
    """
    n = int(np.sum(sizes))
    labels = labels if labels is not None else [int(x) for x in rng.choice(10_000, len(sizes), replace=False)]
    group = np.repeat(np.asarray(labels), sizes)
    length = rng.integers(1, 60, size=n).astype(float)
    log_p0 = -rng.gamma(2.0, 1.0, size=n) * length / 2
    log_p1 = log_p0 + step * (rng.normal(size=n) + 0.05 * (log_p0 - log_p0.mean()))
    log_p1 = np.minimum(log_p1, 0.0)
    ent0 = np.abs(-log_p0 + rng.normal(0, 0.5, size=n))
    ent1 = np.abs(-log_p1 + rng.normal(0, 0.5, size=n))
    stopped = rng.random(n) < 0.8
    out = {
        "log_p0": log_p0,
        "log_p1": log_p1,
        "length": length,
        "group": group,
        "entropy_sum0": ent0,
        "entropy_sum1": ent1,
        "stopped": stopped,
    }
    if shuffle:
        perm = rng.permutation(n)
        out = {k: v[perm] for k, v in out.items()}
    return out


@pytest.fixture(scope="session")
def toy() -> TabularToy:
    """Four prompts, 4 tokens (STOP + 3), depth 4: 121 completions per prompt."""
    return TabularToy(n_prompts=4, vocab=4, depth=4, seed=0)
