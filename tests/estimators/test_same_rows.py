"""``headline`` combines estimates of ONE sample set (issue 30): results computed on different
rows (another sample, another order, other lengths) are refused with a ValueError naming both
arguments; the same rows pass whatever layout or options each call used (2-D [P, G] against 1-D
with any ids, ``include="no_eos"``, a proposal q). Built on the enumerable toy, whose ``rows``
and ``token_rows`` are the engine's two views of the same sampled sequences."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from isdelta.estimators import estimate, estimate_tokens, headline

pytestmark = pytest.mark.filterwarnings("ignore::isdelta.estimators.EstimatorWarning")

G = 16
TOKEN_KEYS = ("token_logp0", "token_logp1", "token_entropy0", "token_entropy1", "mask")


def sample(toy, seed: int, alpha: float = 0.1):
    """Rows [P·G] and token rows [P·G, C] of one sample set of G per prompt."""
    ids = toy.sample(np.random.default_rng(seed), 0.0, 1, G)  # [1, P, G]
    rows = {k: v[0].reshape(-1) for k, v in toy.rows(ids, 0.0, alpha).items()}
    tokens = {k: v[0].reshape(-1, v.shape[-1]) for k, v in toy.token_rows(ids, 0.0, alpha).items()}
    return rows, tokens


def snis_of(rows, group, **kw):
    ent = {k: rows[k] for k in ("entropy_sum0", "entropy_sum1")}
    return estimate(rows["log_p0"], rows["log_p1"], rows["length"], group, **ent, **kw)


def tokens_of(tokens, group, method="cv", **kw):
    return estimate_tokens(*(tokens[k] for k in TOKEN_KEYS), group, method=method, **kw)


@pytest.fixture
def group(toy):
    return np.repeat(np.arange(toy.n_prompts), G)


def test_the_same_rows_pass_in_any_layout_and_with_no_eos(toy, group):
    rows, tokens = sample(toy, 1)
    cv, sn = tokens_of(tokens, group), tokens_of(tokens, group, "pd_sn")
    assert headline(snis_of(rows, group), cv, sn).valid
    # 2-D [P, G] for estimate, 1-D with unsorted string ids for estimate_tokens: one partition
    two_d = {k: v.reshape(toy.n_prompts, G) for k, v in rows.items()}
    names = np.array(["d", "b", "c", "a"])[group]
    assert headline(snis_of(two_d, None), tokens_of(tokens, names)).valid
    # no_eos subtracts the stop token from S0 and L inside estimate; the rows are the same
    eos = {k: rows[k] for k in ("stopped", "eos_logp0", "eos_logp1", "eos_entropy_sum0", "eos_entropy_sum1")}
    assert headline(snis_of(rows, group, include="no_eos", **eos), cv, sn).method in ("cv", "pd_sn", "snis_rb")
    # a proposal q: the fingerprint is of the rows, not of the weights
    logq = np.where(tokens["mask"], tokens["token_logp0"] - 0.01, 0.0)
    tok_q = tokens_of(tokens, group, token_logq=logq)
    headline(snis_of(rows, group, log_q=logq.sum(axis=1)), tok_q)


def test_another_sample_set_is_refused_naming_both_arguments(toy, group):
    rows, tokens = sample(toy, 1)
    _, other = sample(toy, 2)
    snis, cv = snis_of(rows, group), tokens_of(other, group)
    with pytest.raises(ValueError, match=r"^snis, per_decision\[0\] \(cv\): expected results of the same rows"):
        headline(snis, cv)
    # among the per-decision results too, with the position counted over the arguments given
    with pytest.raises(ValueError, match=r"^snis, per_decision\[2\] \(pd_sn\): .*same rows, in the same order"):
        headline(snis, tokens_of(tokens, group), None, tokens_of(other, group, "pd_sn"))


def test_equal_lengths_do_not_hide_another_sample(toy, group):
    """Every row of both sets at the same length (completions cut at max_new_tokens): N, layout and
    lengths agree, log p0 of the rows does not."""
    rows, tokens = sample(toy, 1)
    _, other = sample(toy, 2)
    full = np.ones_like(tokens["mask"])  # count every column: L = C on every row of both sets
    a, b = {**tokens, "mask": full}, {**other, "mask": full}
    S0, S1 = a["token_logp0"].sum(axis=1), a["token_logp1"].sum(axis=1)
    snis = estimate(S0, S1, full.sum(axis=1), group)
    headline(snis, tokens_of(a, group))  # the same rows: no error
    with pytest.raises(ValueError, match=r"other sequences: log p0 of row \d+ is"):
        headline(snis, tokens_of(b, group))
    assert not np.allclose(S0, b["token_logp0"].sum(axis=1))


@pytest.mark.parametrize(
    "change, message",
    [
        ("shuffle", r"grouped into other prompts .*another order"),
        ("drop_prompt", r"64 rows against 48"),
        ("regroup", r"grouped into other prompts \(4 against 8 prompts"),
    ],
)
def test_other_rows_of_the_same_set_are_refused(toy, group, change, message):
    rows, tokens = sample(toy, 1)
    keep = np.arange(len(group))
    tok_group = group
    if change == "shuffle":  # estimate_tokens on the rows in another order
        keep = np.random.default_rng(0).permutation(len(group))
        tok_group = group[keep]
    elif change == "drop_prompt":
        keep = np.flatnonzero(group != 3)
        tok_group = group[keep]
    else:  # the same rows split into 8 prompts of 8
        tok_group = np.repeat(np.arange(8), 8)
    tok = tokens_of({k: v[keep] for k, v in tokens.items()}, tok_group)
    with pytest.raises(ValueError, match=message):
        headline(snis_of(rows, group), tok)


def test_other_lengths_are_refused(toy, group):
    rows, tokens = sample(toy, 1)
    shorter = dict(rows, length=rows["length"] + 1.0)  # e.g. lengths counted with one pad
    with pytest.raises(ValueError, match=r"other lengths \(row 0: \d+ against \d+ counted tokens"):
        headline(snis_of(shorter, group), tokens_of(tokens, group))


def test_results_built_by_hand_carry_no_fingerprint_and_are_not_compared(toy, group):
    rows, tokens = sample(toy, 1)
    _, other = sample(toy, 2)
    snis = snis_of(rows, group)
    by_hand = dataclasses.replace(tokens_of(other, group), fingerprint=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing warned
        headline(snis, by_hand)
    assert snis.to_dict()["fingerprint"] == {"n_rows": 64, "n_prompts": 4, "layout": snis.fingerprint.layout}
