"""step_sweep: α = 0 exact, in-place moves equal to a copied model, parameters restored bit for
bit (also after an error, also in bfloat16); the function-space ΔH₁ against the gradient as
α → 0 without EOS; the comparison report (JSON-safe, plots, markdown)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import PROMPTS

from isdelta.engine import EngineConfig, LogProbEngine
from isdelta.probes import (
    gap_terms,
    gradient_delta,
    markdown_lines,
    per_prompt_points,
    probe_report,
    run_probe,
    snapshot_parameters,
    step_sweep,
)

ENGINE = EngineConfig(progress=False)


def _same(model, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.fixture
def batch(enumerable, rng):
    """Ragged groups of both prompts and a direction that changes H visibly by α = 1."""
    ro, _ = enumerable.sample(rng, [PROMPTS[0], PROMPTS[1]] * 3, [8, 6, 8, 10, 8, 8])
    return ro, enumerable.direction(seed=4, scale=0.05)


def test_alpha_zero_is_exact_and_the_model_is_restored(enumerable, batch):
    """α = 0: ΔH = ΔH_tok = ΔH₁ = 0 exactly and ESS_p = G_p; each α's scores equal those of a copied
    model set to θ0 + α·d; afterwards every parameter is bit-identical to θ0."""
    ro, d = batch
    model = enumerable.model
    before = snapshot_parameters(model)
    res = step_sweep(model, d, ro, [2.0, 0.0, 0.5], engine_config=ENGINE)
    assert _same(model, before)
    assert res.alphas == (0.0, 0.5, 2.0)
    zero = res.estimates[0]
    assert zero.delta.value == 0.0 and zero.delta_tok.value == 0.0 and zero.delta1.value == 0.0
    assert zero.cov_term == 0.0 and zero.kl_term == 0.0 and res.delta1_tok_fs[0] == 0.0
    sizes = np.array([8, 6, 8, 10, 8, 8])  # ESS_p = G_p; pooled P²/Σ 1/ESS_p is N only for equal G
    assert zero.ess_min == pytest.approx(6, rel=1e-12) and zero.ess_mean == pytest.approx(sizes.mean(), rel=1e-12)
    assert zero.ess == pytest.approx(len(sizes) ** 2 / np.sum(1 / sizes), rel=1e-12)
    naive = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in naive.named_parameters():
            p.add_(2.0 * d[n])
    s2 = LogProbEngine(ENGINE).score(naive, ro).logp.numpy()
    np.testing.assert_allclose(res.scores["logp"][2], s2, rtol=1e-6, atol=1e-6)
    assert res.estimates[2].delta.value != 0.0 and res.gradient is None and res.delta1_grad() is None


def test_parameters_are_restored_after_an_error_and_in_bfloat16(enumerable, batch):
    """A direction that makes the logits NaN fails mid-sweep, θ0 is back; a bf16 model too."""
    ro, d = batch
    model = copy.deepcopy(enumerable.model)
    before = snapshot_parameters(model)
    bad = dict(d, **{"lm_head.weight": torch.full_like(d["lm_head.weight"], float("nan"))})
    with pytest.raises(FloatingPointError):
        step_sweep(model, bad, ro, [0.0, 1.0], engine_config=ENGINE)
    assert _same(model, before)
    bf16 = model.to(torch.bfloat16)
    before = snapshot_parameters(bf16)
    res = step_sweep(bf16, d, ro, [0.3, 1.7], engine_config=ENGINE, estimator_kw={"weights": "none"})
    assert _same(bf16, before) and np.isfinite(res.estimates[1].delta.value)


def test_function_space_meets_the_gradient_as_alpha_to_zero_without_eos(enumerable, batch):
    """include_eos=False: the estimator's ΔH₁(α)/α (with its stop-token term) and the probe's
    per-token function-space line tend to the gradient probe's values; per-prompt values
    average to the pooled ones."""
    ro, d = batch
    cfg = EngineConfig(progress=False, include_eos=False)
    grad = gradient_delta(enumerable.model, ro, d, per_token=True, engine_config=cfg)
    alpha = 1e-3
    res = step_sweep(
        enumerable.model, d, ro, [alpha], engine_config=cfg, gradient=grad, estimator_kw={"weights": "none"}
    )
    assert res.include == "no_eos"
    assert res.estimates[0].delta1.value / alpha == pytest.approx(grad.delta1.value, rel=1e-2)
    assert res.delta1_tok_fs[0] / alpha == pytest.approx(grad.delta1_tok.value, rel=2e-2)
    points = per_prompt_points(res, alpha)
    assert np.mean([p["delta1"]["value"] for p in points]) == pytest.approx(res.estimates[0].delta1.value, rel=1e-9)
    assert np.mean([p["delta1_grad"] for p in points]) == pytest.approx(alpha * grad.delta1.value, rel=1e-9)


@pytest.mark.parametrize("include_eos", [True, False])
def test_gap_terms_split_the_gap_exactly(enumerable, rng, include_eos):
    """ΔĤ − ΔH₁ = sample_size + nonlinear + kl (1e-12); with equal G and EOS counted the
    sample-size part is −ΔH₁/G exactly (SNIS's (G − 1)/G shrinkage of the covariance)."""
    ro, _ = enumerable.sample(rng, [PROMPTS[0], PROMPTS[1]] * 2, [8] * 4)
    d = enumerable.direction(seed=4, scale=0.05)
    cfg = EngineConfig(progress=False, include_eos=include_eos)
    res = step_sweep(enumerable.model, d, ro, [1e-3, 1.0], engine_config=cfg, estimator_kw={"weights": "none"})
    for a, e in enumerate(res.estimates):
        gaps = gap_terms(res, a)
        assert e.delta.value - e.delta1.value == pytest.approx(sum(gaps.values()), abs=1e-12)
    small, e = gap_terms(res, 0), res.estimates[0]
    if include_eos:
        assert small["sample_size"] == pytest.approx(-e.delta1.value / 8, rel=1e-12)


def test_run_probe_writes_a_json_safe_report_plots_and_markdown(enumerable, batch, tmp_path):
    """run_probe: probe.json (allow_nan=False), probe.md with one table row per α, two PNGs;
    relative errors are None where ΔH = 0 (α = 0)."""
    ro, d = batch
    before = snapshot_parameters(enumerable.model)
    rep = run_probe(
        enumerable.model,
        d,
        ro,
        None,
        alphas=[0, 0.25, 1, 4],
        gradient=True,
        engine_config=ENGINE,
        estimator_kw={"weights": "psis"},
        out_dir=tmp_path,
    )
    assert _same(enumerable.model, before)
    assert json.loads((tmp_path / "probe.json").read_text())["summary"] == rep["summary"]
    for name in ("probe.md", "probe_sweep.png", "probe_per_prompt.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = rep["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.25, 1.0, 4.0]
    assert rows[0]["rel_err_fs"] is None and rows[0]["sign_grad"] is None
    assert rows[2]["delta1_grad"] == pytest.approx(rep["sweep"]["gradient"]["delta1"]["value"])
    md = markdown_lines(rep)
    assert sum(line.startswith(("| 4 |", "| 0.25 |")) for line in md) == 2
    assert rep["per_prompt"]["alpha"] == 1.0 and len(rep["per_prompt"]["points"]) == 6
    again = probe_report(step_sweep(enumerable.model, d, ro, [0.5], engine_config=ENGINE), None)
    assert again["plots"] == [] and again["per_prompt"]["alpha"] == 0.5


def test_bad_options_raise_with_a_fix(enumerable, batch):
    """alphas, estimator options that contradict the engine config, an unswept α."""
    ro, d = batch
    with pytest.raises(ValueError, match="finite"):
        step_sweep(enumerable.model, d, ro, [0.5, float("nan")], engine_config=ENGINE)
    with pytest.raises(ValueError, match="include_eos"):
        step_sweep(enumerable.model, d, ro, [1.0], engine_config=ENGINE, estimator_kw={"include": "no_eos"})
    with pytest.raises(ValueError, match="unknown option"):
        step_sweep(enumerable.model, d, ro, [1.0], engine_config=ENGINE, estimator_kw={"weigths": "none"})
    res = step_sweep(enumerable.model, d, ro, [1.0], engine_config=ENGINE)
    with pytest.raises(ValueError, match="not a step"):
        per_prompt_points(res, 2.0)
