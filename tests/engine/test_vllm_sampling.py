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
