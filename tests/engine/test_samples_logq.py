"""Samples' optional token_logq (a sampler q ≠ p0): its checks, and save/load with and without it."""

from __future__ import annotations

import json

import pytest
import torch

from isdelta.engine import LogitTransform, Rollouts
from isdelta.engine.samples import Samples

EOS = 2


def make_samples(token_logq=None, backend="hf") -> Samples:
    """Two prompts × two rows: lengths 3 (EOS), 2 (length), 1 (EOS), 0; C = 3 completion columns."""
    ro = Rollouts.from_token_lists([[1, 5], [1, 6, 7]], [[9, 8, EOS], [4, 4], [EOS], []], eos_token_ids=EOS)
    return Samples(
        ro,
        ("ab", "cc", "", ""),
        ("p0", "p1"),
        ("eos", "length", "eos", "length"),
        LogitTransform(0.7, 5, 0.9),
        2,
        3,
        seed=4,
        stop_strings=("\n",),
        backend=backend,
        token_logq=token_logq,
    )


def good_logq() -> torch.Tensor:
    return torch.tensor([[-0.5, -1.0, -0.1], [-2.0, -0.25, 0.0], [-0.75, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_counted_columns_follow_the_completion_mask():
    s = make_samples(good_logq(), "vllm")
    assert s.token_logq.shape == s.rollouts.completion_mask.shape == (4, 3)
    assert s.to_dict()["backend"] == "vllm" and s.to_dict()["token_logq"] is True
    assert make_samples().token_logq is None and make_samples().to_dict()["token_logq"] is False


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_save_load_round_trip_with_and_without_logq(tmp_path, backend):
    for logq in (None, good_logq()):
        s = make_samples(logq, backend)
        s.save(tmp_path / "s.pt")
        back = Samples.load(tmp_path / "s.pt")
        assert back.backend == backend and back.texts == s.texts and back.transform == s.transform
        assert torch.equal(back.rollouts.input_ids, s.rollouts.input_ids)
        if logq is None:
            assert back.token_logq is None
        else:
            assert back.token_logq.dtype == torch.float32 and torch.equal(back.token_logq, logq)


def test_a_save_from_before_the_backend_field_loads_as_hf(tmp_path):
    make_samples().save(tmp_path / "s.pt")
    js = tmp_path / "s.json"
    meta = json.loads(js.read_text())
    del meta["backend"]  # what an older isdelta wrote
    js.write_text(json.dumps(meta))
    back = Samples.load(tmp_path / "s.pt")
    assert back.backend == "hf" and back.token_logq is None


def test_bad_token_logq_names_the_rows_and_the_fix():
    with pytest.raises(TypeError, match="float32 tensor"):
        make_samples(good_logq().double())
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*\(4, 3\)"):
        make_samples(good_logq()[:, :2].contiguous())
    pos = good_logq()
    pos[2, 0] = 0.3
    with pytest.raises(ValueError, match=r"rows \[2\] is non-finite or positive"):
        make_samples(pos)
    inf = good_logq()
    inf[0, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[0\] is non-finite"):
        make_samples(inf)
    stray = good_logq()
    stray[1, 2] = -0.5  # past row 1's two counted tokens
    with pytest.raises(ValueError, match=r"rows \[1\] is non-zero past the counted tokens"):
        make_samples(stray)
    with pytest.raises(ValueError, match="backend must be 'hf' or 'vllm'"):
        make_samples(None, "sglang")


def test_vllm_backend_needs_a_vllm_model(tiny_llama, char_tok):
    """No vllm needed: the back end is checked before vllm is touched."""
    from isdelta.engine.sampling import sample

    kw = dict(num_samples=2, transform=LogitTransform(), max_new_tokens=3, progress=False)
    with pytest.raises(TypeError, match=r"backend='vllm' samples a VLLMModel; got LlamaForCausalLM.*load_vllm"):
        sample(tiny_llama, char_tok, ["hi"], backend="vllm", **kw)
    with pytest.raises(ValueError, match="backend must be 'hf' or 'vllm'; got 'sglang'"):
        sample(tiny_llama, char_tok, ["hi"], backend="sglang", **kw)
