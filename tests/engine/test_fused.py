"""The compiled chunk statistics (engine/fused.py) and the eager ones (chunks.token_stats) against
float64 logits: vocabulary sizes that are not multiples of 64/128/256 (verl's fused kernel once
added e^0 from zero-padded vocabulary tiles to the normaliser), from 3 to Gemma 3's 262144 and the
prime-ish 262147; all-negative, very peaked, near-flat and exactly flat rows, with temperatures;
the engine at V = 262144 with a one-row last chunk; and the "auto" rule."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, Rollouts, fused
from isdelta.engine.chunks import token_stats
from tests.conftest import one_layer_llama

# inductor's CPU code needs a C++ compiler; without one the engine runs its eager path (tested in
# test_logprob.py), and there is nothing compiled here to test
pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler on PATH: torch.compile cannot build the fused CPU kernel here",
)

# smaller than a SIMD vector, a prime, SmolLM2's, GPT-2's, Llama 3's + 1, Qwen 2.5's, Gemma 3's, a prime
VOCABS = [3, 1021, 49152, 50257, 128256 + 1, 151936, 262144, 262147]
EOS = torch.tensor([2, 7])  # two stop ids: the same compiled graph as the engine tests'
FUSED_TOL = 1e-5  # relative, max(1, |value|); measured < 1e-7 at every V here
EAGER_TOL = 1e-4  # the eager path's fp32 sums along V: measured up to 3.1e-5 (Var, V = 262144, T = 0.7)


def eos_for(V: int) -> torch.Tensor:
    return EOS % V  # still two ids at V = 3


def eager_stats(z, targets, eos, temperature):
    """``chunks.token_stats``, the engine's eager path (it works on a copy: it frees its input)."""
    rows = torch.zeros_like(targets)
    return token_stats(z.clone(), targets, rows, eos, LogitTransform(temperature=temperature))


def odd_rows(V: int, seed: int = 0) -> torch.Tensor:
    """[6, V] fp32 logits, one regime per row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, V, generator=g)
    z[0] *= 3  # an ordinary spread
    z[1] = z[1] * 3 - 1000  # all negative, far from 0: fp32 spacing 6e-5 at |z| = 1000
    z[2, 5 % V] += 60  # very peaked: p(5) = 1 − 1e-20, H ~ 1e-20
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


@pytest.mark.parametrize("path", ["fused", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", VOCABS)
def test_statistics_equal_float64_logits(V, temperature, path):
    z, eos = odd_rows(V), eos_for(V)
    targets = torch.tensor([0, 1, 5, V - 1, 3, 50]) % V  # the peaked row scores its peak; one the last id
    if path == "fused":
        got, tol = fused.chunk_stats(z, targets, eos, torch.tensor([temperature])), FUSED_TOL
        assert got is not None, "torch.compile is unavailable here"
    else:
        got, tol = eager_stats(z, targets, eos, temperature), EAGER_TOL
    assert all(x.dtype == torch.float32 and x.shape == (6,) for x in got)
    want = float64_stats(z, targets, eos, temperature)
    for name, a, ref in zip(("log p", "H", "Var", "stop share"), got, want):
        assert relative_error(a, ref) < tol, (name, relative_error(a, ref))
    # the near-flat row's entropy is log V − Var/2 to fp32 precision, not log of a padded width
    assert abs(got[1][3].item() - (math.log(V) - 0.5e-6 / temperature**2)) < tol * math.log(V)


@pytest.mark.parametrize("V", [3, 1021, 262144, 262147])
def test_a_row_of_equal_logits_has_entropy_log_v(V):
    """p = 1/V exactly: H = log V, Var[−log p] = 0, log p = −log V, at any offset. A kernel that
    pads the row to its tile width with logit 0 (not −inf) gives log(padded width) instead."""
    targets, eos = torch.tensor([0, V - 1, V // 2, 1]) % V, eos_for(V)
    z = torch.tensor([0.0, 7.5, -1000.0, 1e4])[:, None].expand(4, V).contiguous()  # [4, V], one value a row
    fused_out = fused.chunk_stats(z, targets, eos, torch.ones(1))
    eager_out = eager_stats(z, targets, eos, 1.0)
    # fused: one fp32 rounding of log V (≤ 4.8e-7 near 12); eager: its fp32 block sums of V equal
    # terms err in one direction (measured 7.1e-5 nats at V = 262144, 3.8e-5 at 262147)
    for (logp, H, var, _), tol_H, tol_var in ((fused_out, 1e-6, 1e-12), (eager_out, 2e-4, 1e-7)):
        assert (H.double() - math.log(V)).abs().max() < tol_H
        assert (logp.double() + math.log(V)).abs().max() < 1e-6
        assert var.abs().max() < tol_var


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


def test_the_engine_at_v_262144_with_a_one_row_last_chunk():
    """Gemma 3's vocabulary through the whole engine, both paths, against float64 statistics of the
    model's own logits: chunks of M − 1 rows then one (the default 2**23 elements would be 32
    rows), near-uniform rows (random weights: H ≈ log V, the worst case for long fp32 sums)."""
    torch.manual_seed(0)
    V = 262144
    model = one_layer_llama(V)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 5)]
    comps = [torch.randint(3, V, (n,), generator=g).tolist() for n in (6, 4, 5, 3)]
    ro = Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)  # G = 2 rows a prompt
    M = int(ro.mask(True).sum())
    att = ro.attention_mask
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0))
    logp = torch.log_softmax(logits.logits[:, ro.prompt_len - 1 : -1].double(), -1)  # [N, C, V] float64
    H = -(logp.exp() * logp).sum(-1)
    var = (logp.exp() * (logp + H[..., None]) ** 2).sum(-1)
    token_logp = logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    base = EngineConfig(progress=False, chunk_elems=(M - 1) * V)
    out = {f: LogProbEngine(base, fused=f).score(model, ro) for f in ("on", "off")}
    m = out["on"].mask
    assert H[m].min() > 12.0  # log V = 12.48
    for f, tol_H in (("on", 1e-5), ("off", 2e-4)):  # measured 4.7e-7 and 1.4e-5 (flat rows: 7e-5)
        s = out[f]
        assert (s.token_logp[m].double() - token_logp[m]).abs().max() < 1e-5, f
        assert (s.token_entropy[m].double() - H[m]).abs().max() < tol_H, f
        assert (s.token_varentropy[m].double() - var[m]).abs().max() < 1e-6, f  # Var ≤ 6e-3; measured ≤ 8e-9


def test_auto_counts_the_calls_a_caller_pins_its_answer_for():
    cpu, n = torch.device("cpu"), fused.FUSE_MIN_LOGITS["cpu"] // 16
    assert not fused.worth_fusing(n, cpu) and not fused.worth_fusing(n, cpu, calls=15)
    assert fused.worth_fusing(n, cpu, calls=16)
    # a monitor's step of this size (two calls) fuses: ten steps of it reach the break-even
    assert fused.worth_fusing(n, cpu, calls=2 * fused.MONITOR_STEPS)
