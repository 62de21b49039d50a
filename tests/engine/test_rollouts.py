"""Rollouts builders and validation: the layout of DESIGN.md §2 and errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from isdelta.engine import Rollouts, completion_mask


def test_from_token_lists_layout_prompt_major():
    prompts = [[5, 6, 7], [8]]
    comps = [[11, 2], [12, 13, 14], [15], [2]]
    ro = Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=0)
    assert ro.prompt_len == 3 and ro.input_ids.shape == (4, 6)
    assert ro.group.tolist() == [0, 0, 1, 1]
    assert ro.input_ids[2].tolist() == [0, 0, 8, 15, 0, 0]
    assert ro.attention_mask[2].tolist() == [0, 0, 1, 1, 0, 0]
    assert ro.lengths.tolist() == [2, 3, 1, 1]
    assert ro.stopped.tolist() == [True, False, False, True]
    assert ro.mask(include_eos=False).sum(-1).tolist() == [1, 3, 1, 0]


def test_groups_inferred_from_identical_prompts_and_ragged():
    prompts = [[5, 6], [7], [5, 6]]
    ro = Rollouts.from_token_lists(prompts, [[3], [4], [5]], eos_token_ids=2)
    assert ro.group.tolist() == [0, 1, 0] and ro.n_prompts == 2


def test_from_tensors_matches_from_token_lists():
    a = Rollouts.from_token_lists([[5, 6, 7], [8]], [[11, 2], [12, 13]], eos_token_ids=2, pad_token_id=2)
    b = Rollouts.from_tensors(
        a.prompt_ids,
        a.attention_mask[:, :3],
        a.completion_ids,
        completion_mask(a.completion_ids, 2, a.completion_lengths),
        eos_token_ids=2,
        num_generations=1,
    )
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.completion_mask, b.completion_mask)


def test_right_padded_prompt_is_refused():
    with pytest.raises(ValueError, match=r"rows \[1\].*LEFT-padded"):
        Rollouts.from_tensors(
            torch.tensor([[5, 6], [7, 0]]),
            torch.tensor([[1, 1], [1, 0]]),
            torch.tensor([[3], [4]]),
            torch.tensor([[1], [1]]),
            eos_token_ids=2,
        )


def test_trainer_mask_past_the_stop_token_is_refused():
    # the trainer counted tokens after the EOS (mask from pad identity, pad != eos): refuse.
    with pytest.raises(ValueError, match=r"rows \[0\].*disagrees"):
        Rollouts.from_tensors(
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            torch.tensor([[3, 2, 4]]),
            torch.tensor([[1, 1, 1]]),
            eos_token_ids=2,
        )


def test_non_prefix_completion_mask_is_refused():
    with pytest.raises(ValueError, match="ones-then-zeros"):
        Rollouts.from_tensors(
            torch.tensor([[5]]),
            torch.tensor([[1]]),
            torch.tensor([[3, 4, 5]]),
            torch.tensor([[1, 0, 1]]),
            eos_token_ids=2,
        )


def test_ids_beyond_vocab_are_refused():
    with pytest.raises(ValueError, match=r"rows \[1\].*vocab size 50"):
        Rollouts.from_token_lists([[5], [6]], [[3], [77]], eos_token_ids=2, vocab_size=50)


def test_empty_prompt_and_missing_eos_are_refused():
    with pytest.raises(ValueError, match="empty"):
        Rollouts.from_token_lists([[], [6]], [[3], [4]], eos_token_ids=2)
    with pytest.raises(ValueError, match="eos_token_ids"):
        Rollouts.from_token_lists([[5]], [[3]], eos_token_ids=[])


def test_prompt_count_must_divide_rows():
    with pytest.raises(ValueError, match="multiple"):
        Rollouts.from_token_lists([[5], [6]], [[3], [4], [5]], eos_token_ids=2)


def test_concat_repads_and_keeps_prompts_distinct():
    a = Rollouts.from_token_lists([[5, 6, 7]], [[11, 2], [12]], eos_token_ids=2)
    b = Rollouts.from_token_lists([[8]], [[13, 14, 15], [2]], eos_token_ids=2)
    c = Rollouts.concat([a, b])
    assert c.prompt_len == 3 and c.input_ids.shape == (4, 6)
    assert c.group.tolist() == [0, 0, 1, 1]
    assert c.lengths.tolist() == [2, 1, 3, 1]
    assert c.prompt_lengths.tolist() == [3, 3, 1, 1]
    # the same rows built in one go give the same real tokens in the same places
    d = Rollouts.from_token_lists([[5, 6, 7], [8]], [[11, 2], [12], [13, 14, 15], [2]], eos_token_ids=2)
    assert torch.equal(c.attention_mask, d.attention_mask)
    assert torch.equal(c.input_ids * c.attention_mask, d.input_ids * d.attention_mask)
    assert c.select([2, 3]).lengths.tolist() == [3, 1]
