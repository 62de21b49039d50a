"""The blocked passes behind ``estimate`` (moments.py) against their naive equivalents: each
estimate on its own through ``uncertainty.weighted_ratio`` / ``covariance`` + ``standard_error``;
blocks of any size against one block (the same floats); the [P, G] broadcast path (equal G)
against the [N] path that ragged prompts take; and the fast prompt grouping of sorted ids
against the general one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import random_rows

from isdelta.estimators import estimate, groups, inputs, moments, psis
from isdelta.estimators.groups import Groups, make_groups
from isdelta.estimators.uncertainty import covariance, standard_error, weighted_ratio
from isdelta.estimators.weights import weigh

SIZES = {"equal": [30] * 7, "ragged": [2, 5, 9, 40, 26, 3]}
ESTIMATES = [f"{n}{tok}{rb}" for n in ("h0", "h1", "delta") for tok in ("", "_tok") for rb in ("", "_rb")]


def _rows(rng, sizes, shuffle=True):
    r = random_rows(rng, sizes, shuffle=shuffle)
    return r, inputs.prepare(
        r["log_p0"], r["log_p1"], r["length"], r["group"], entropy_sum0=r["entropy_sum0"],
        entropy_sum1=r["entropy_sum1"], stopped=r["stopped"],
    )  # fmt: skip


def _estimate(r, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(
            r["log_p0"], r["log_p1"], r["length"], r["group"], entropy_sum0=r["entropy_sum0"],
            entropy_sum1=r["entropy_sum1"], stopped=r["stopped"], **kw,
        )  # fmt: skip


@pytest.mark.parametrize("prompts", ["fixed", "sampled"])
@pytest.mark.parametrize("proposal", [False, True], ids=["u=1/G", "u=p0/q"])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_ratio_estimates_equal_weighted_ratio_one_at_a_time(rng, sizes, proposal, prompts):
    _, rows = _rows(rng, sizes)
    g = rows.groups
    w = weigh(rows.log_r, g, "psis", None).w
    u = weigh(rng.normal(0.0, 0.3, g.n_rows), g, "none", None).w if proposal else None
    sums = moments.row_sums(rows, w, u, covariance=False)
    got = moments.ratio_estimates(rows, w, u, prompts, 0.95, 1.96, sums)
    u_rows = g.uniform if u is None else u
    for suffix, (f0, f1) in {"": (-rows.s0, -rows.s1), "_rb": (rows.ent0, rows.ent1)}.items():
        for tok, denom in (("", None), ("_tok", rows.length)):
            h0, h1 = weighted_ratio(u_rows, f0, denom, g), weighted_ratio(w, f1, denom, g)
            for name, lin in (("h0", h0), ("h1", h1), ("delta", h1 - h0)):
                est = got[f"{name}{tok}{suffix}"]
                assert est.value == pytest.approx(lin.value, rel=1e-12, abs=1e-13), name + tok + suffix
                assert est.se == pytest.approx(standard_error(lin, g, prompts), rel=1e-12), name + tok + suffix


@pytest.mark.parametrize("prompts", ["fixed", "sampled"])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_row_sums_and_first_order_equal_the_direct_sums(rng, sizes, prompts):
    _, rows = _rows(rng, sizes)
    g = rows.groups
    w = weigh(rows.log_r, g, "truncate", None).w
    sums = moments.row_sums(rows, w, None, covariance=True)
    u = g.uniform
    direct = {
        "u.length": g.sum(u * rows.length), "u.s0": g.sum(u * rows.s0), "u.ent0": g.sum(u * rows.ent0),
        "w.length": g.sum(w * rows.length), "w.s1": g.sum(w * rows.s1), "w.ent1": g.sum(w * rows.ent1),
        "u.s0/length": g.sum(u * (rows.s0 / rows.length)), "w.s1/length": g.sum(w * (rows.s1 / rows.length)),
        "u.stopped": g.sum(u * ~rows.stopped), "kl": g.sum(w * rows.log_r),
        "cov_term": g.sum((w - u) * (rows.s0 - g.expand(g.mean(rows.s0)))),
    }  # fmt: skip
    for k, v in direct.items():
        np.testing.assert_array_equal(sums[k], v, err_msg=k)
    assert sums["n_empty"] == 0
    lin = covariance(rows.s0, rows.log_r, g)
    got = moments.first_order(sums, g, prompts, 0.95, 1.96)
    assert got["delta1"].value == -lin.value
    assert got["delta1"].se == pytest.approx(standard_error(lin, g, prompts), rel=1e-12)
    assert got["kl_term"] == -g.sum(w * rows.log_r).mean()


@pytest.mark.parametrize("weights", ["psis", "none", "truncate"])
@pytest.mark.parametrize("sizes", [[64] * 9, [30, 2, 64, 50, 7, 100], [40] * 3 + [41] * 3, [100, 100, 80]])
def test_blocks_of_any_size_give_the_same_floats(rng, monkeypatch, sizes, weights):
    """Per-prompt work block by block: 64-row blocks (a prompt per block, or several) against one
    block; the same floats (SEs to rounding where a block's prompts are equal and the others not)."""
    r, _ = _rows(rng, sizes)
    whole = _estimate(r, weights=weights)
    monkeypatch.setattr(groups, "BLOCK_ROWS", 64)
    monkeypatch.setattr(psis, "BLOCK_ROWS", 64)
    small = _estimate(r, weights=weights)
    for name in [*ESTIMATES, "delta1"]:
        a, b = getattr(small, name), getattr(whole, name)
        assert a.value == b.value, name
        # a block of equal prompts inside ragged ones sums ψ² by einsum: the same to rounding
        assert a.se == (b.se if len(set(sizes)) == 1 else pytest.approx(b.se, rel=1e-12)), name
    diag = ("kl", "cov_term", "kl_term", "ess", "khat", "s_min", "nll0_tok", "nll1_tok", "mean_ratio_min")
    assert [getattr(small, k) for k in diag] == [getattr(whole, k) for k in diag]
    for k in ("w", "log_w", "w_raw", "ess", "khat", "mean_ratio"):
        np.testing.assert_array_equal(getattr(small.weights, k), getattr(whole.weights, k), err_msg=k)


@pytest.mark.parametrize("prompts", ["fixed", "sampled"])
@pytest.mark.parametrize("weights", ["psis", "none", "clip"])
def test_equal_prompts_broadcast_path_equals_the_ragged_path(rng, monkeypatch, weights, prompts):
    """Equal G: per-prompt terms broadcast over [P, G] views, Σψ² by einsum; the general path
    expands them to [N] (what ragged prompts take). Values are the same floats, SEs to rounding."""
    r, _ = _rows(rng, [40] * 8)
    kw = {"weights": weights, "clip": 1.5 if weights == "clip" else None, "prompts": prompts}
    fast = _estimate(r, **kw)
    monkeypatch.setattr(Groups, "equal_sizes", property(lambda self: False))
    general = _estimate(r, **kw)
    for name in [*ESTIMATES, "delta1"]:
        a, b = getattr(fast, name), getattr(general, name)
        assert a.value == b.value, name
        assert a.se == pytest.approx(b.se, rel=1e-12), name
    for name in ("kl", "cov_term", "kl_term", "ess", "khat", "nll0_tok", "nll1_tok", "mean_length"):
        assert getattr(fast, name) == pytest.approx(getattr(general, name), rel=1e-12), name
    np.testing.assert_array_equal(fast.weights.w, general.weights.w)


@pytest.mark.parametrize(
    "ids",
    [
        np.repeat([3, 7, 8, 20], [4, 2, 5, 3]),  # sorted ints: the fast path
        np.repeat([0.0, 1.0, 5.0], 3),  # sorted whole floats
        np.repeat([9, 2, 4], [3, 3, 2]),  # contiguous, not sorted
        np.array([1, 2, 1, 2, 3, 3, 1]),  # interleaved
        np.array(["b", "b", "a", "c", "a"]),  # strings
        np.zeros(6, dtype=int),  # one prompt
    ],
)
def test_prompt_groups_equal_make_groups_of_the_codes(ids):
    fast = inputs.prompt_groups(ids, ids.size)
    ref = make_groups(*inputs.group_codes(ids, ids.size))
    np.testing.assert_array_equal(fast.labels, ref.labels)
    np.testing.assert_array_equal(fast.sizes, ref.sizes)
    np.testing.assert_array_equal(fast.starts, ref.starts)
    assert (fast.order is None) == (ref.order is None)
    if ref.order is not None:
        np.testing.assert_array_equal(fast.order, ref.order)


def test_layout_digest_is_of_the_partition_only(rng):
    """The same partition in any ids and layout gives one digest; another partition another."""
    r = random_rows(rng, [20, 20, 20], shuffle=False, labels=[0, 1, 2])
    args = (r["log_p0"], r["log_p1"], r["length"])
    ok = {
        k: np.repeat(ids, 20)
        for k, ids in {"sorted": [0, 1, 2], "descending": [9, 5, 1], "str": ["c", "a", "b"]}.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        digests = {k: estimate(*args, g).fingerprint.layout for k, g in ok.items()}
        digests["2d"] = estimate(*(a.reshape(3, 20) for a in args)).fingerprint.layout
        other = estimate(*args, np.tile(np.repeat([0, 1, 2], 10), 2)).fingerprint.layout
    assert len(set(digests.values())) == 1, digests
    assert other != digests["sorted"]
