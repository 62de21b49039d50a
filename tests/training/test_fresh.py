"""Fresh rows: new samples of p0 for a batch's prompts (isdelta.training.fresh)."""

from __future__ import annotations

import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, sample
from isdelta.training import distinct_prompts, fresh_rows


def test_distinct_prompts_strip_padding_on_either_side_in_order_of_first_appearance():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [0, 0, 5, 6], [0, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert distinct_prompts(ids, mask) == [[5, 6], [7, 8, 9]]


def test_fresh_rows_are_the_samples_sample_draws_for_those_prompt_tokens(tiny_llama, char_tok):
    """The rows are ``sample``'s for the same tokens, transform and seed: G per prompt, prompt-major;
    another seed draws other rows; fewer than 2 per prompt is refused with the reason."""
    cfg = EngineConfig(temperature=0.8, top_k=20)
    prompts = [char_tok("2+2=")["input_ids"], char_tok("abc")["input_ids"]]
    kw = dict(num_samples=3, engine_config=cfg, max_new_tokens=6, eos_token_ids=[char_tok.eos_token_id])
    ro = fresh_rows(tiny_llama, char_tok, prompts, seed=5, **kw)
    ref = sample(tiny_llama, char_tok, prompts, num_samples=3, transform=LogitTransform(temperature=0.8, top_k=20),
                 max_new_tokens=6, seed=5, eos_token_ids=[char_tok.eos_token_id], progress=False).rollouts  # fmt: skip
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(ro.completion_ids, ref.completion_ids) and torch.equal(ro.prompt_ids, ref.prompt_ids)
    other = fresh_rows(tiny_llama, char_tok, prompts, seed=6, **kw)
    assert not torch.equal(other.completion_ids, ro.completion_ids)
    with pytest.raises(ValueError, match="num_samples must be ≥ 2"):
        fresh_rows(tiny_llama, char_tok, prompts, seed=5, **{**kw, "num_samples": 1})
