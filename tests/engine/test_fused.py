"""The compiled chunk statistics (engine/fused.py) against float64 logits: vocabulary sizes that
are not multiples of 64/128/256 (verl's fused kernel once added e^0 from zero-padded vocabulary
tiles to the normaliser), all-negative, very peaked and near-flat rows, with temperatures."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from isdelta.engine import fused

# inductor's CPU code needs a C++ compiler; without one the engine runs its eager path (tested in
# test_logprob.py), and there is nothing compiled here to test
pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler on PATH: torch.compile cannot build the fused CPU kernel here",
)

# SmolLM2's, GPT-2's, Llama 3's + 1, Qwen 2.5's
VOCABS = [49152, 50257, 128256 + 1, 151936]
EOS = torch.tensor([2, 7])  # two stop ids: the same compiled graph as the engine tests'


def odd_rows(V: int, seed: int = 0) -> torch.Tensor:
    """[6, V] fp32 logits, one regime per row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, V, generator=g)
    z[0] *= 3  # an ordinary spread
    z[1] = z[1] * 3 - 1000  # all negative, far from 0: fp32 spacing 6e-5 at |z| = 1000
    z[2, 5] += 60  # very peaked: p(5) = 1 − 1e-20, H ~ 1e-20
    z[3] *= 1e-3  # near-flat: H = log V − 5e-7, Var ~ 1e-6
    z[4] = z[4] * 20  # wide: a few tokens carry the mass
    z[5, :100] += 8  # a block of 100 likely tokens far above the rest
    return z


def float64_stats(z, targets, eos, temperature):
    """The definition on float64 logits: log p(target), H, Var[−log p], −Σ_eos p log p."""
    logp = torch.log_softmax(z.double() / temperature, -1)
    p = logp.exp()
    H = -(p * logp).sum(-1)
    var = (p * (logp + H[:, None]) ** 2).sum(-1)
    stop = -(p[:, eos] * logp[:, eos]).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), H, var, stop


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", VOCABS)
def test_fused_statistics_equal_float64_logits(V, temperature):
    z = odd_rows(V)
    targets = torch.tensor([0, 1, 5, V - 1, 3, 50])  # the peaked row scores its peak; one the last id
    got = fused.chunk_stats(z, targets, EOS, torch.tensor([temperature]))
    assert got is not None, "torch.compile is unavailable here"
    assert all(x.dtype == torch.float32 and x.shape == (6,) for x in got)
    want = float64_stats(z, targets, EOS, temperature)
    for name, a, ref in zip(("log p", "H", "Var", "stop share"), got, want):
        assert relative_error(a, ref) < 1e-5, (name, relative_error(a, ref))  # measured: < 2e-7
    # the flat row's entropy is log V to fp32 precision, not log of a padded width
    assert abs(got[1][3].item() - (torch.log(torch.tensor(float(V))).item() - 0.5e-6 / temperature**2)) < 1e-5


def test_a_one_row_chunk_equals_its_row_in_a_larger_chunk():
    """One-row chunks are padded to two (dynamo specialises sizes of 1)."""
    z = odd_rows(50257, seed=1)
    targets = torch.arange(6)
    full = fused.chunk_stats(z, targets, EOS, torch.ones(1))
    for r in (0, 2, 5):
        one = fused.chunk_stats(z[r : r + 1], targets[r : r + 1], EOS, torch.ones(1))
        assert all(x.shape == (1,) for x in one)
        for a, b in zip(one, full):
            torch.testing.assert_close(a, b[r : r + 1], atol=1e-6, rtol=1e-6)


def test_half_precision_logits_are_upcast_inside():
    """A bf16 head's logits: the kernel reads bf16 and computes in fp32/fp64, like ``.float()`` first."""
    z = odd_rows(49152, seed=2).bfloat16()
    targets = torch.arange(6)
    a = fused.chunk_stats(z, targets, EOS, torch.ones(1))
    b = fused.chunk_stats(z.float(), targets, EOS, torch.ones(1))
    assert all(x.dtype == torch.float32 for x in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_non_finite_logits_give_non_finite_statistics():
    """NaN, +inf or −inf anywhere in a row reaches H or Var (the engine then names the rows)."""
    z = odd_rows(1000, seed=3)
    z[0, 10], z[2, 20], z[4, 30] = float("nan"), float("inf"), float("-inf")
    _, H, var, _ = fused.chunk_stats(z, torch.arange(6), EOS, torch.ones(1))
    bad = ~torch.isfinite(H + var)
    assert bad.tolist() == [True, False, True, False, True, False]


def test_auto_rule_thresholds():
    cpu = torch.device("cpu")
    assert not fused.worth_fusing(fused.FUSE_MIN_LOGITS["cpu"] - 1, cpu)
    assert fused.worth_fusing(fused.FUSE_MIN_LOGITS["cpu"], cpu)
    assert not fused.worth_fusing(2**62, torch.device("meta"))  # unmeasured devices: only fused="on"
