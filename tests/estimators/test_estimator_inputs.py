"""Bad input raises ValueError naming the argument, what was expected and what arrived."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import random_rows

from isdelta.estimators import estimate, weights


@pytest.fixture
def rows(rng):
    return random_rows(rng, [30, 30, 30], shuffle=False, labels=[0, 1, 2])


def call(rows, **overrides):
    kw = {k: rows[k] for k in ("log_p0", "log_p1", "length", "group")}
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(**kw)


def with_value(x: np.ndarray, index: int, value) -> np.ndarray:
    out = np.array(x, dtype=float)
    out[index] = value
    return out


BAD = {
    "log_p1 too short": (lambda r: {"log_p1": r["log_p1"][:-1]}, r"log_p1: expected shape \(90,\).*got \(89,\)"),
    "length too long": (
        lambda r: {"length": np.append(r["length"], 3)},
        r"length: expected shape \(90,\).*got \(91,\)",
    ),
    "group wrong length": (lambda r: {"group": r["group"][:10]}, r"group: expected shape \(90,\).*got \(10,\)"),
    "nan in log_p0": (
        lambda r: {"log_p0": with_value(r["log_p0"], 4, np.nan)},
        r"log_p0: expected finite values, got 1 non-finite \(nan\) at rows \[4\]",
    ),
    "-inf in log_p1": (
        lambda r: {"log_p1": with_value(r["log_p1"], 7, -np.inf)},
        r"log_p1: expected finite.*\(-inf\).*zero probability",
    ),
    "inf in log_p0": (lambda r: {"log_p0": with_value(r["log_p0"], 0, np.inf)}, r"log_p0: expected finite.*\(inf\)"),
    "positive log-prob": (
        lambda r: {"log_p0": -r["log_p0"]},
        r"log_p0: expected log-probabilities \(≤ 0\).*negative log-likelihoods",
    ),
    "nan length": (lambda r: {"length": with_value(r["length"], 2, np.nan)}, r"length: expected finite"),
    "negative length": (lambda r: {"length": with_value(r["length"], 5, -1)}, r"length: expected .*≥ 0.*rows \[5\]"),
    "one-row group": (
        lambda r: {"group": np.r_[r["group"][:-1], 9]},
        r"group: expected at least 2 rows per prompt.*ids \[9\]",
    ),
    "weights typo": (
        lambda r: {"weights": "pareto"},
        r"weights: expected one of \['none', 'psis', 'truncate', 'clip'\], got 'pareto'",
    ),
    "include typo": (lambda r: {"include": "eos"}, r"include: expected one of \['all', 'no_eos'\], got 'eos'"),
    "prompts typo": (lambda r: {"prompts": "random"}, r"prompts: expected one of \['fixed', 'sampled'\], got 'random'"),
    "level 0": (lambda r: {"level": 0.0}, r"level: expected a coverage probability in \(0, 1\), got 0.0"),
    "level 1": (lambda r: {"level": 1}, r"level: expected .*\(0, 1\), got 1"),
    "level 95": (lambda r: {"level": 95}, r"level: expected .*got 95"),
    "clip missing": (lambda r: {"weights": "clip"}, r"clip: weights='clip' needs a finite cap c > 0"),
    "clip negative": (lambda r: {"weights": "clip", "clip": -1.0}, r"clip: .*c > 0.*got -1.0"),
    "clip unused": (lambda r: {"weights": "psis", "clip": 2.0}, r"clip: only used with weights='clip'"),
    "2-D with group": (
        lambda r: {k: r[k].reshape(3, 30) for k in ("log_p0", "log_p1", "length")},
        r"group: expected None with 2-D inputs of shape \(3, 30\)",
    ),
    "3-D input": (
        lambda r: {k: r[k].reshape(3, 3, 10) for k in ("log_p0", "log_p1", "length")} | {"group": None},
        r"log_p0: expected a 1-D array \[N\].*or a 2-D array \[P, G\], got shape \(3, 3, 10\)",
    ),
    "one entropy sum": (lambda r: {"entropy_sum0": r["entropy_sum0"]}, r"entropy_sum0, entropy_sum1: expected both"),
    "entropy sum shape": (
        lambda r: {"entropy_sum0": r["entropy_sum0"][:5], "entropy_sum1": r["entropy_sum1"]},
        r"entropy_sum0: expected shape \(90,\)",
    ),
    "stopped shape": (lambda r: {"stopped": r["stopped"][:3]}, r"stopped: expected shape \(90,\).*got \(3,\)"),
    "stopped not bool": (lambda r: {"stopped": np.full(90, 2)}, r"stopped: expected booleans"),
    "no_eos without eos": (
        lambda r: {"include": "no_eos", "stopped": r["stopped"]},
        r"include: 'no_eos' needs eos_logp0, eos_logp1 \(shape \(90,\)\)",
    ),
    "eos args without no_eos": (lambda r: {"eos_logp0": np.zeros(90)}, r"eos_logp0: only used with include='no_eos'"),
    "sampled with one prompt": (
        lambda r: {"group": None, "prompts": "sampled"},
        r"prompts: 'sampled' needs at least 2 prompts",
    ),
    "empty": (
        lambda r: {k: np.array([]) for k in ("log_p0", "log_p1", "length")} | {"group": None},
        r"log_p0: expected at least 2 rows, got an empty array",
    ),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_bad_input_raises_with_argument_name(rows, case):
    make, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        call(rows, **make(rows))


def test_no_eos_rejects_stop_row_with_zero_length(rows):
    stopped = np.ones(90, dtype=bool)
    length = with_value(rows["length"], 11, 0)
    with pytest.raises(ValueError, match=r"length: rows with stopped=True must count their stop token.*\[11\]"):
        call(rows, length=length, include="no_eos", stopped=stopped,
             eos_logp0=np.full(90, -0.1), eos_logp1=np.full(90, -0.1))  # fmt: skip


def test_no_eos_rejects_eos_logp_larger_than_the_total(rows):
    stopped = np.ones(90, dtype=bool)
    eos = rows["log_p0"] - 1.0  # more negative than the whole row: not one of its terms
    with pytest.raises(ValueError, match=r"eos_logp0: the stop token's log-prob is below"):
        call(rows, include="no_eos", stopped=stopped, eos_logp0=eos, eos_logp1=np.full(90, -0.1))


def test_no_eos_ignores_eos_values_on_rows_without_stop(rows):
    stopped = np.zeros(90, dtype=bool)
    stopped[:10] = True
    eos = np.where(stopped, -0.05, np.nan)  # nan where there is no stop token: fine
    res = call(rows, include="no_eos", stopped=stopped, eos_logp0=eos, eos_logp1=eos)
    assert np.isfinite(res.delta.value)


def test_weights_helper_validates_its_options(rng):
    with pytest.raises(ValueError, match=r"scheme: expected one of"):
        weights.importance_weights(rng.normal(size=10), scheme="smooth")
    with pytest.raises(ValueError, match=r"clip: scheme='clip' needs"):
        weights.importance_weights(rng.normal(size=10), scheme="clip")
    with pytest.raises(ValueError, match=r"log_r: expected finite"):
        weights.importance_weights(np.r_[rng.normal(size=10), np.nan])
