"""The run program with a sampler q ≠ p0 (sampling.backend: vllm): the config key, and the
estimates and report with a synthetic token_logq on a tiny model's real samples and scores.

Compared against: the run without q (q = p0 exactly must give the same numbers to 1e-12), and a
known per-token perturbation (the report's gap must equal it)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from isdelta.estimators import estimate, estimate_per_prompt, sampler_gap
from isdelta.program import ConfigError
from isdelta.run import run
from isdelta.run.config import config_hash, load_config
from isdelta.run.report import summary_markdown
from isdelta.run.stages import estimate_inputs, token_estimates

BASE = {"model": {"path": "smollm2-135m-instruct"}, "data": {"path": "builtin:math"}, "update": {"loss": "reinforce"}}
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
ROWS = [
    {"prompt": "1+1=", "answer": "2", "response": "2"},
    {"prompt": "2+3=", "answer": "5", "response": "5"},
    {"prompt": "hi", "answer": "0", "response": "hello"},
]


def test_backend_defaults_to_hf_and_keeps_older_hashes():
    plain = load_config(BASE)
    assert plain.sampling.backend == "hf"
    assert config_hash(load_config(BASE, ["sampling.backend=hf"])) == config_hash(plain)
    dump = plain.model_dump(mode="json", exclude={"output", "tokens", "checkpoints"})
    assert "backend" in dump["sampling"]  # in the saved config.yaml, not in the hash at its default
    with pytest.raises(ConfigError, match=r"sampling\.backend: .*'hf' or 'vllm'.*got 'sglang'"):
        load_config(BASE, ["sampling.backend=sglang"])


@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed here: the missing-package error cannot occur")
def test_vllm_without_vllm_is_one_config_error_with_the_install_command():
    with pytest.raises(ConfigError) as e:
        load_config(BASE, ["sampling.backend=vllm"])
    lines = [x for x in str(e.value).splitlines() if "sampling.backend" in x]
    assert len(lines) == 1 and "vllm is not installed" in lines[0] and "make vllm-setup" in lines[0]


@pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm importable (make vllm-setup; run under .venv-vllm)")
def test_vllm_backend_refuses_stages_that_read_samples_as_p0s():
    cfg = load_config(BASE, ["sampling.backend=vllm"])
    assert cfg.sampling.backend == "vllm" and config_hash(cfg) != config_hash(load_config(BASE))
    with pytest.raises(ConfigError, match=r"sampling\.backend: vllm samples from a proposal.*`probe`"):
        load_config({**BASE, "probe": {}}, ["sampling.backend=vllm"])


@pytest.fixture(scope="module")
def scored(tmp_path_factory, char_tok):
    """A tiny model's run (HF back end): its saved scores under p0 and p1 and the stop flags."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    tmp = tmp_path_factory.mktemp("proposal")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp / "p0")
    char_tok.save_pretrained(tmp / "p0")
    (tmp / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    raw = {
        "model": {"path": str(tmp / "p0")},
        "data": {"path": str(tmp / "data.jsonl")},
        "update": {"loss": "sft", "lr": 0.002},
        "sampling": {"num_samples": 6, "max_new_tokens": 10, "prompts_per_batch": 3},
        "output": {"dir": str(tmp / "out"), "plots": False},
    }
    cfg = load_config(raw)
    report = run(cfg)
    s0, s1 = (dict(np.load(tmp / "out" / f"scores{k}.npz")) for k in (0, 1))
    return cfg, s0, s1, s0["stopped"], report


def _numbers(res) -> np.ndarray:
    keys = ("h0", "h1", "delta", "h0_tok", "h1_tok", "delta_tok", "delta_rb", "delta_tok_rb")
    return np.array([[getattr(res, k).value, getattr(res, k).se] for k in keys if getattr(res, k) is not None])


def test_q_equal_to_p0_gives_the_no_q_numbers(scored):
    cfg, s0, s1, stopped, report = scored
    args, kw = estimate_inputs(cfg, s0, s1, stopped)
    args_q, kw_q = estimate_inputs(cfg, s0, s1, stopped, s0["token_logp"].astype(np.float64))
    assert "log_q" not in kw and np.allclose(kw_q["log_q"], s0["logp"], rtol=0, atol=1e-12)
    plain, with_q = estimate(*args, **kw), estimate(*args_q, **kw_q)
    np.testing.assert_allclose(_numbers(with_q), _numbers(plain), rtol=0, atol=1e-12)
    assert plain.delta.value == report["estimate"]["delta"]["value"]  # the run's own numbers
    assert with_q.proposal is not None and with_q.proposal.ess_frac == pytest.approx(1.0, abs=1e-12)
    pp, pp_q = estimate_per_prompt(*args, **kw), estimate_per_prompt(*args_q, **kw_q)
    for p in pp:
        np.testing.assert_allclose(_numbers(pp_q[p]), _numbers(pp[p]), rtol=0, atol=1e-12)
    for a, b in zip(token_estimates(cfg, s0, s1), token_estimates(cfg, s0, s1, s0["token_logp"].astype(float))):
        for k in ("delta", "delta_tok", "h1"):
            assert getattr(b, k).value == pytest.approx(getattr(a, k).value, abs=1e-12)
            assert getattr(b, k).se == pytest.approx(getattr(a, k).se, abs=1e-12)


def test_a_known_perturbation_shows_in_the_report(scored, tmp_path, rng):
    from isdelta.estimators import headline
    from isdelta.run.report import write_report

    cfg, s0, s1, stopped, _ = scored
    mask = s0["mask"]
    eps = rng.uniform(0.0, 0.05, size=mask.shape)  # nats, known per token: q below p0 on every token
    logq = np.where(mask, s0["token_logp"] - eps, 0.0)
    args, kw = estimate_inputs(cfg, s0, s1, stopped, logq)
    res = estimate(*args, **kw)
    tok = token_estimates(cfg, s0, s1, logq)
    gap = sampler_gap(logq, s0["token_logp"], mask, s0["group"])
    d = eps[mask]
    assert gap.mean_abs == pytest.approx(d.mean()) and gap.max_abs == pytest.approx(d.max())
    assert gap.frac_over == pytest.approx((d > 0.01).mean()) and 0 < gap.ess_frac < 1
    decision = headline(res, *tok, support_size=96)
    meta = {"p0": "tiny", "p1": "tiny after a step", "transform": {}, "timings": {}}
    rep = write_report(
        tmp_path, res, s0, s1, ["x"] * len(stopped), meta, {}, decision, tok=tok[0], plots=False, gap=gap
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (
        saved["sampler_gap"] == json.loads(json.dumps(rep["sampler_gap"]))
        and saved["sampler_gap"]["n_tokens"] == mask.sum()
    )
    assert saved["sampler_gap"]["mean_abs"] == pytest.approx(d.mean()) and "warning" in saved["sampler_gap"]
    assert saved["estimate"]["proposal"]["ess_frac"] == pytest.approx(res.proposal.ess_frac)
    md = (tmp_path / "summary.md").read_text()
    assert "## Sampler–scorer gap" in md and f"{d.mean():.3g} / {d.max():.3g}" in md and str(res.proposal) in md
    assert "Sampler–scorer gap" not in summary_markdown(res, meta, decision, tok[0])  # without q: no section


@pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm importable (make vllm-setup; run under .venv-vllm)")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="head_dim 16 is a limit of vLLM's CPU kernels")
def test_a_vllm_failure_is_named_with_the_fallback_not_called_a_bug(tmp_path, char_tok):
    """A model shape vLLM's CPU attention refuses (head_dim 16) ended in "unexpected EngineDeadError
    … this is a bug in isdelta" (issue 30, kind 13): now one line naming vLLM, its version, the root
    cause its engine process printed and the fallback, exit 2."""
    import os
    import subprocess
    import sys

    import torch
    import vllm
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = tmp_path / "head16"
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": 64, "num_hidden_layers": 1})).save_pretrained(model)
    char_tok.save_pretrained(model)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {
        "model": {"path": str(model)},
        "data": {"path": str(tmp_path / "data.jsonl")},
        "update": {"loss": "sft", "lr": 1e-3},
        "sampling": {"num_samples": 2, "max_new_tokens": 4, "backend": "vllm"},
        "output": {"dir": str(tmp_path / "out"), "plots": False},
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, "-m", "isdelta.run", str(tmp_path / "cfg.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 2 and "error: " in res.stderr, res.stderr[-3000:]
    # the line after vLLM's own output (a progress bar may leave no newline before it)
    line = res.stderr[res.stderr.rindex("error: ") :].splitlines()[0]
    assert f"vLLM {vllm.__version__} failed while sampling" in line
    assert "Unsupported CPU attention configuration: head_dim=16" in line and "sampling.backend: hf" in line
    assert "bug in isdelta" not in res.stderr and "Traceback" not in line
