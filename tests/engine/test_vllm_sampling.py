"""The vLLM back end against the HF back end (layout, prompts, stop rules) and the engine's p0
(vLLM's processed log q of each sampled token vs the engine's log p0 of the same token).

Runs where vllm is importable (``make vllm-setup``, then ``.venv-vllm/bin/python -m pytest
tests/engine/test_vllm_sampling.py``); elsewhere the module is skipped with the reason. Starting
vLLM on SmolLM2 takes about a minute on two CPU cores: one engine serves every test.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make vllm-setup; run these tests with .venv-vllm/bin/python -m pytest)",
    ),
]

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine  # noqa: E402
from isdelta.engine.sampling import sample  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "What is 2+3?"}],
    "The capital of France is",
    [{"role": "user", "content": "Hi"}],
]
TRANSFORM = LogitTransform(temperature=0.8, top_k=40, top_p=0.95)
KW = dict(num_samples=4, transform=TRANSFORM, max_new_tokens=24, stop_strings=("\n",), progress=False)
GAP_MEAN, GAP_MAX = 1e-3, 0.05  # nats; float32 on both sides: rounding-size differences only


# ---------------------------------------------------------------------------- what vLLM refuses
# first in the file: each starts (or refuses) before the module's SmolLM2 engine exists
def test_values_vllm_would_refuse_or_alter_are_refused_before_it_starts(tmp_path):
    import json

    from isdelta.engine.vllm_sampling import check_vllm_options
    from isdelta.program import ConfigError
    from isdelta.run.config import load_config

    with pytest.raises(ValueError, match=r"temperature 3 is above 2, the largest vLLM samples at"):
        check_vllm_options(transform=LogitTransform(temperature=3.0))
    with pytest.raises(ValueError, match=r"num_samples 20000 is above"):
        check_vllm_options(num_samples=20000)
    check_vllm_options(transform=LogitTransform(temperature=2.0), num_samples=16384)
    raw = {"model": {"path": "m"}, "data": {"path": "builtin:math"}, "update": {"loss": "sft"}}
    with pytest.raises(ConfigError, match=r"sampling\.temperature 3 is above 2.*sampling\.backend: hf"):
        load_config(json.loads(json.dumps(raw)), ["sampling.backend=vllm", "sampling.temperature=3"])
    assert load_config(raw, ["sampling.temperature=3"]).sampling.temperature == 3  # the HF back end takes it


@pytest.fixture(scope="module")
def head16_folder(tmp_path_factory, char_tok):
    """A tiny Llama with head_dim 16 (hidden 64, 4 heads): vLLM starts on it, then its CPU attention
    kernels refuse it at the first forward, in an engine process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("head16")
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": 64, "num_hidden_layers": 1})).save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="head_dim 16 is a limit of vLLM's CPU attention kernels")
def test_an_engine_failure_names_vllm_its_version_and_the_root_cause(head16_folder, char_tok):
    """Once "unexpected EngineDeadError: EngineCore encountered an issue ... a bug in isdelta"; the
    real cause was printed only by vLLM's worker process."""
    import vllm

    from isdelta.engine.vllm_sampling import SamplerEngineError, load_vllm

    with pytest.raises(SamplerEngineError) as info, load_vllm(head16_folder, dtype="float32") as v:
        sample(v, char_tok, ["hi"], num_samples=2, transform=LogitTransform(), max_new_tokens=4, backend="vllm")
    msg = str(info.value)
    assert msg.startswith(f"vLLM {vllm.__version__} failed while sampling: ")
    assert "RuntimeError: Unsupported CPU attention configuration: head_dim=16" in msg
    assert "sampling.backend: hf" in msg and "EngineDeadError" not in msg
    assert info.value.cause.startswith("RuntimeError: Unsupported CPU attention configuration")


# ---------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2):
    """vLLM on SmolLM2's de-quantised weights, saved once as an HF folder."""
    from isdelta.engine.vllm_sampling import load_vllm, save_for_vllm

    model, tok = smollm2
    folder = save_for_vllm(model, tok, tmp_path_factory.mktemp("vllm") / "smollm2", {"path": "smollm2"})
    with load_vllm(folder, dtype="float32", seed=0) as v:
        yield v


@pytest.fixture(scope="module")
def drawn(engine, smollm2):
    return sample(engine, smollm2[1], PROMPTS, seed=3, backend="vllm", **KW)


def test_same_layout_and_prompts_as_hf(drawn, smollm2):
    model, tok = smollm2
    hf = sample(model, tok, PROMPTS, seed=3, **KW)
    v = drawn
    assert v.backend == "vllm" and hf.backend == "hf" and hf.token_logq is None
    assert v.prompt_texts == hf.prompt_texts and v.n_rows == hf.n_rows == 12
    assert v.rollouts.group.tolist() == hf.rollouts.group.tolist() == [r // 4 for r in range(12)]
    assert v.rollouts.eos_token_ids == hf.rollouts.eos_token_ids
    for r in range(12):  # the same prompt tokens, row by row
        a = v.rollouts.prompt_ids[r][v.rollouts.attention_mask[r, : v.rollouts.prompt_len].bool()]
        b = hf.rollouts.prompt_ids[r][hf.rollouts.attention_mask[r, : hf.rollouts.prompt_len].bool()]
        assert a.tolist() == b.tolist()
    assert [x == "eos" for x in v.stop_reason] == v.rollouts.stopped.tolist()
    assert all(L == 24 for L, x in zip(v.rollouts.lengths.tolist(), v.stop_reason) if x == "length")
    assert v.token_logq.shape == v.rollouts.completion_mask.shape and v.token_logq.dtype == torch.float32


def test_stop_strings_trim_at_the_earliest_prefix(drawn, smollm2):
    tok = smollm2[1]
    ro = drawn.rollouts
    for r, reason in enumerate(drawn.stop_reason):
        kept = ro.completion_ids[r, : int(ro.completion_lengths[r])].tolist()
        text = tok.decode(kept, skip_special_tokens=False)
        if reason == "stop_string":  # the last kept token completes the first "\n", not before it
            assert "\n" in text and "\n" not in tok.decode(kept[:-1], skip_special_tokens=False)
        else:
            assert "\n" not in tok.decode(kept[:-1] if reason == "eos" else kept, skip_special_tokens=False)


def test_token_logq_is_the_engines_p0_up_to_rounding(drawn, smollm2):
    model, _ = smollm2
    s0 = LogProbEngine(EngineConfig.from_transform(TRANSFORM, progress=False)).score(model, drawn.rollouts).to_numpy()
    m = s0["mask"]
    assert np.array_equal(m, drawn.rollouts.completion_mask.numpy())
    gap = np.abs(drawn.token_logq.double().numpy() - s0["token_logp"])[m]
    print(f"vLLM log q vs engine log p0 over {m.sum()} tokens: mean {gap.mean():.3g}, max {gap.max():.3g} nats")
    assert gap.mean() < GAP_MEAN and gap.max() < GAP_MAX
    assert (drawn.token_logq.numpy()[~m] == 0).all()


def test_seeds_reproduce(engine, drawn, smollm2):
    again = sample(engine, smollm2[1], PROMPTS, seed=3, backend="vllm", **KW)
    assert torch.equal(again.rollouts.input_ids, drawn.rollouts.input_ids)
    assert again.texts == drawn.texts and again.stop_reason == drawn.stop_reason
    # the same tokens; their log q only to rounding (vLLM's batch composition changes the sums' order)
    torch.testing.assert_close(again.token_logq, drawn.token_logq, atol=1e-4, rtol=0)
    other = sample(engine, smollm2[1], PROMPTS, seed=4, backend="vllm", **KW)
    assert other.texts != drawn.texts
