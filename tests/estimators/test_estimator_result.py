"""Result types (units, JSON, summary, immutability) and the layer's import rules."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import random_rows

import isdelta.estimators as estimators
from isdelta.estimators import EntropyDelta, Estimate, estimate, weights

PACKAGE = Path(estimators.__file__).parent


@pytest.fixture
def result(rng) -> EntropyDelta:
    rows = random_rows(rng, [30, 40, 35])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(
            rows["log_p0"], rows["log_p1"], rows["length"], rows["group"],
            entropy_sum0=rows["entropy_sum0"], entropy_sum1=rows["entropy_sum1"],
            stopped=rows["stopped"], level=0.9,
        )  # fmt: skip


def test_estimate_converts_to_bits_and_back():
    est = Estimate.normal(1.0, 0.1, 0.95, 1.959963984540054)
    assert est.ci_low == pytest.approx(1.0 - 0.1959963984540054)
    bits = est.bits
    assert bits.unit == "bits" and bits.value == pytest.approx(1.0 / math.log(2))
    assert bits.se == pytest.approx(0.1 / math.log(2))
    assert bits.bits is bits and est.nats is est
    assert bits.nats.value == pytest.approx(1.0) and bits.nats.ci_high == pytest.approx(est.ci_high)
    d = bits.to_dict()  # always nats first, bits with a suffix, whatever the unit held
    assert d["value"] == pytest.approx(1.0) and d["value_bits"] == pytest.approx(1 / math.log(2))


def test_ci_uses_the_normal_quantile_of_level(result):
    from scipy.stats import norm

    z = norm.ppf(0.95)  # level 0.9, two-sided
    est = result.delta
    assert est.level == 0.9
    assert est.ci_high - est.value == pytest.approx(z * est.se, rel=1e-12)
    assert est.value - est.ci_low == pytest.approx(z * est.se, rel=1e-12)


def test_to_dict_is_strict_json_with_nats_and_bits(result):
    d = result.to_dict()
    text = json.dumps(d, allow_nan=False)  # nan / inf must have become None
    back = json.loads(text)
    assert back["delta"]["value"] == pytest.approx(result.delta.value)
    assert back["delta"]["value_bits"] == pytest.approx(result.delta.value / math.log(2))
    assert back["kl_bits"] == pytest.approx(result.kl / math.log(2))
    assert back["h0_rb"] is not None and back["n_rows"] == 105
    assert set(f.name for f in dataclasses.fields(EntropyDelta)) <= set(back)


def test_non_finite_diagnostics_become_null_in_json(rng):
    rows = random_rows(rng, [4, 4])  # 8 rows: k̂ not estimable (nan), S_min nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate(rows["log_p0"], rows["log_p1"], rows["length"], rows["group"])
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["khat"] is None and d["s_min"] is None and d["khat_status"] == "not estimable"
    assert d["h0_rb"] is None and d["no_stop_frac"] is None


def test_summary_shows_both_units_every_estimate_and_warnings(result):
    text = result.summary()
    assert "nats" in text and "bits" in text and "90% CI" in text
    for label in ("H0 (sequence)", "ΔH (sequence)", "ΔH / token", "ΔH (sequence) RB", "ΔH₁"):
        assert label in text
    assert f"{result.delta.value:+.5g}" in text
    assert f"{result.delta.bits.value:+.5g}" in text
    assert result.weights_used in text
    if result.warnings:
        assert "warnings:" in text


def test_results_are_frozen(result):
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.delta = result.h0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.delta.value = 0.0


def test_diagnostic_fields_are_plain_numbers(result):
    assert isinstance(result.n_rows, int) and isinstance(result.n_prompts, int)
    assert result.n_prompts == 3 and result.n_rows == 105
    assert 0 <= result.no_stop_frac <= 1
    assert result.ess_min <= result.ess_mean <= 40
    assert 0 < result.ess_frac <= 1
    assert result.mean_ratio_min <= result.mean_ratio_max


def test_importance_weights_keeps_a_two_d_layout(rng):
    log_r = rng.normal(size=(3, 30))
    res = weights.importance_weights(log_r, scheme="none")
    assert res.log_w.shape == (3, 30)
    np.testing.assert_allclose(np.exp(res.log_w).sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(res.ess, 1.0 / (np.exp(res.log_w) ** 2).sum(axis=1), rtol=1e-12)


def test_estimators_never_import_torch():
    """Static check over every module of the layer (DESIGN §1: numpy, scipy, arviz only)."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert (
                    root in {"numpy", "scipy", "arviz", "arviz_stats", "isdelta", "__future__"}
                    or root in sys.stdlib_module_names
                ), (path.name, name)


def test_import_does_not_load_arviz():
    code = "import sys, isdelta.estimators; print('arviz' in sys.modules, 'arviz_stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_public_names():
    assert {"estimate", "EntropyDelta", "Estimate", "weights"} <= set(estimators.__all__)
    assert {"estimate_tokens", "TokenDelta"} <= set(estimators.__all__)
