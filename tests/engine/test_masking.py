"""The masking table of DESIGN.md §3, case by case, against hand-written expected masks."""

from __future__ import annotations

import pytest
import torch

from isdelta.engine import completion_mask, first_stop_index, position_ids

EOS, PAD = 2, 2  # pad == eos, as in SmolLM2 / Qwen / Llama with pad = eos

# (case, completion ids, real length, eos ids, include_eos, expected mask)
CASES = [
    ("stop then pads equal to eos", [5, 6, 2, 2, 2], 3, {2}, True, [1, 1, 1, 0, 0]),
    ("stop excluded", [5, 6, 2, 2, 2], 3, {2}, False, [1, 1, 0, 0, 0]),
    ("no stop: all real tokens", [5, 6, 7, 8, 2], 4, {2}, True, [1, 1, 1, 1, 0]),
    ("no stop, cut at max_new_tokens", [5, 6, 7, 8, 9], 5, {2}, True, [1, 1, 1, 1, 1]),
    ("immediate stop, included", [2, 2, 2, 2, 2], 1, {2}, True, [1, 0, 0, 0, 0]),
    ("immediate stop, excluded: L = 0", [2, 2, 2, 2, 2], 1, {2}, False, [0, 0, 0, 0, 0]),
    ("tokens after the first stop never count", [5, 2, 7, 2, 8], 5, {2}, True, [1, 1, 0, 0, 0]),
    ("several stop ids, second one first", [5, 9, 2, 0, 0], 3, {2, 9}, True, [1, 1, 0, 0, 0]),
    ("several stop ids, excluded", [5, 9, 2, 0, 0], 3, {2, 9}, False, [1, 0, 0, 0, 0]),
    ("pad id differs from eos", [5, 6, 2, 0, 0], 3, {2}, True, [1, 1, 1, 0, 0]),
    ("eos-valued pad past the real length is not a stop", [5, 6, 7, 2, 2], 3, {2}, True, [1, 1, 1, 0, 0]),
    ("empty completion", [2, 2, 2, 2, 2], 0, {2}, True, [0, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("case,ids,length,eos,include_eos,expected", CASES, ids=[c[0] for c in CASES])
def test_masking_table(case, ids, length, eos, include_eos, expected):
    got = completion_mask(torch.tensor([ids]), eos, torch.tensor([length]), include_eos=include_eos)
    assert got.int().tolist() == [expected]


def test_batched_rows_are_independent():
    ids = torch.tensor([c[1] for c in CASES if c[3] == {2}])
    lengths = torch.tensor([c[2] for c in CASES if c[3] == {2}])
    for include_eos in (True, False):
        want = [c[5] for c in CASES if c[3] == {2} and c[4] == include_eos]
        rows = [i for i, c in enumerate([c for c in CASES if c[3] == {2}]) if c[4] == include_eos]
        got = completion_mask(ids, {2}, lengths, include_eos=include_eos)[rows]
        assert got.int().tolist() == want


def test_lengths_default_to_all_columns():
    ids = torch.tensor([[5, 6, 7], [5, 2, 2]])
    assert completion_mask(ids, 2).int().tolist() == [[1, 1, 1], [1, 1, 0]]
    assert first_stop_index(ids, 2).tolist() == [3, 1]


def test_bad_lengths_name_the_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        completion_mask(torch.zeros(2, 3, dtype=torch.long), 2, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="shape"):
        completion_mask(torch.zeros(2, 3, dtype=torch.long), 2, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("n_pads", [0, 1, 3])
def test_position_ids_start_at_zero_after_left_pads(n_pads):
    att = torch.tensor([[0] * n_pads + [1] * 4 + [0] * 2])
    pos = position_ids(att)
    assert pos[0, n_pads : n_pads + 4].tolist() == [0, 1, 2, 3]
    assert pos[0, :n_pads].tolist() == [0] * n_pads  # clamped, never negative
