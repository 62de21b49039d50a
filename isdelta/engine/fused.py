"""The chunk statistics in one compiled pass over the vocabulary (``EngineConfig(fused=...)``).

Per row of an [m, V] chunk of LM-head logits z and temperature T (no top-k / top-p)::

    c  = max_v z_v                                   loop 1 over the row: a max, no exp
    d_v = (z_v − c) / T                              loop 2, one exp per logit:
    S0 = Σ_v e^d_v,  S1 = Σ_v e^d_v·d_v,  S2 = Σ_v e^d_v·d_v²      (float64 accumulators)

    log p(v) = d_v − log S0            H = log S0 − S1/S0            Var[−log p] = S2/S0 − (S1/S0)²

and the stop ids' share −Σ_e p(e) log p(e) from d at those ids. ``torch.compile`` (inductor)
turns this into one loop over rows, each row read twice while it sits in cache: vectorised C++
on CPU, a Triton reduction on CUDA. The eager path (``chunks.token_stats``) reads and
writes the whole chunk six to eight times (log_softmax, exp, two row dots, the centring,
squares); on one core of an AMD EPYC (AVX-512) a [170, 49152] chunk takes 6.0 ms here
against 59 ms eager (``benchmarks/bench_fused.py``, run 20261130T091646).

Why float64 accumulators: raw moments cancel, Var = E[d²] − E[d]², and in fp32 the error is
ε·E[d²], up to ~1e-4 nats² when the mass sits far below the max (E[d]² ≈ H² ≈ 100). The
products e^d·d and e^d·d² of the fp32 values are exact in float64, so the only fp32 errors left
are those of d and e^d themselves, on which H and Var depend smoothly, as in the eager path's
centred sum. It cost 1.1 ms of 4.7 in an earlier measurement (fp32 accumulators: 3.6 ms).

When it runs (``EngineConfig.fused``): "on" always, "off" never, "auto" when the compile pays.
The engine resolves "auto" once per score call from the call's size alone (counted tokens × V,
:func:`worth_fusing`), never from whether a kernel happens to be compiled already: p0 and p1 of
one batch are one size (the same rows, one vocabulary), so they take one path, in one process or
in two (a resumed run), and scoring one model twice stays bit-identical (ΔH = 0 exactly; the two
paths agree to ~1e-5 relative, not bit for bit). "The kernel is compiled, so it is free now" would flip
p1 onto the other path whenever anything compiled between the two calls, or when only p1's
process had compiled. A caller that scores many batches of one kind decides once for all of
them and pins the answer:

- ``EntropyMonitor`` (``training/pinned.py``) decides at its first scored batch, as if the run
  measured ``MONITOR_STEPS`` steps like it (p0 + p1: two score calls a step), then scores every
  step with fused="on" or "off": p0 and p1 of one step, and of every later step, on one path.
- The run (``run/scoring.py``) keeps the per-call rule and records the path each score file took
  (a per-row ``fused`` array in the npz); p1, and the probe's sweep, take the path p0's file
  records, also when p0 was scored by an earlier process.

Sizes are symbolic (``dynamic=True``): one compiled kernel serves every chunk height and
vocabulary size, so nothing recompiles per micro-batch, per last chunk or per model. Dynamo
specialises a size of 1, so a one-row chunk is padded to two; one stop id and several are two
graphs. When ``torch.compile`` is unavailable or fails (no C++ compiler, an unsupported
platform), :func:`chunk_stats` returns None and the engine runs its eager path: a debug-level
log line once per device type, no warning, no error.
"""

from __future__ import annotations

import logging
import warnings

import torch

__all__ = ["FUSE_MIN_LOGITS", "MONITOR_STEPS", "available", "chunk_stats", "worth_fusing"]

log = logging.getLogger(__name__)

# fused="auto": the logits (counted tokens × V) one score call must reach before the compile pays
# for itself in that call alone. CPU, measured by benchmarks/bench_fused.py on a 2-core AMD EPYC
# (run 20261130T091646, V = 49152 … 151936): the compile costs 10.4–10.8 s in a fresh process
# with an empty inductor cache and 3.1–3.4 s with a warm one (/tmp/torchinductor_<user>, kept
# between runs); the fused statistics save 5.4–6.3 ns per logit on one thread, 9–13 on two.
# Break-even: 2**27.8–2**29.3 logits warm, 2**29.6–2**30.9 cold. 2**30 (~21800 tokens at
# V = 49152) repays a warm compile twice over and a cold one on two threads. CUDA: not measured
# (no GPU was lent); the eager passes are bandwidth-bound, ~10 ps per logit saved on an H100-class
# GPU against tens of seconds of Triton compile, hence 2**40. Other devices: only with fused="on".
FUSE_MIN_LOGITS = {"cpu": 2**30, "cuda": 2**40}

# EntropyMonitor, fused="auto": the measured steps its first scored batch is taken to stand for.
# It fuses when MONITOR_STEPS steps like it (two score calls a step, p0 and p1; one where the
# trainer's old_logp stands in for p0) reach FUSE_MIN_LOGITS: ten steps must repay the compile by
# the margin one call must show alone. The case, a 16k-token step of SmolLM2 (V = 49152),
# is 2 × 8.1e8 = 1.6e9 logits ≥ 2**30 in one step: at 5.4–6.3 ns a logit that step alone saves
# 8.7–10 s (one thread) against the 3.1–10.8 s compile, and every later step as much again. The
# bar, 2**30 / 10 = 1.1e8 logits a step (~1100 tokens a call at V = 49152, ~200 at 262144), is where
# ten steps save 6–7 s, twice a warm compile; a run that stops sooner loses one compile at most.
# Runs measure hundreds of steps: ten is a floor, not an estimate of their length.
MONITOR_STEPS = 10

_kernel = None  # the compiled _stats, built on first use
_failed: set[str] = set()  # device types where torch.compile failed: eager from then on


def worth_fusing(n_logits: int, device: torch.device, calls: int = 1) -> bool:
    """Whether compiling pays for ``calls`` score calls of ``n_logits`` logits each on ``device``:
    ``n_logits · calls ≥ FUSE_MIN_LOGITS``. A function of the sizes and the device type only,
    never of whether a kernel is compiled (the module docstring says why); False where
    ``torch.compile`` failed, whose calls run eagerly anyway."""
    if not available(device):
        return False
    return n_logits * calls >= FUSE_MIN_LOGITS.get(device.type, float("inf"))


def available(device: torch.device) -> bool:
    """False once ``torch.compile`` failed on this device type in this process: eager from then on."""
    return device.type not in _failed


def _stats(logits: torch.Tensor, targets: torch.Tensor, eos: torch.Tensor, temperature: torch.Tensor):
    """The function compiled: (token log p, H, Var[−log p], stop share) [m] float32 of logits [m, V]."""
    z = logits.float()  # [m, V]; a bf16/fp16 head's output is upcast in registers, not copied
    c = z.amax(-1, keepdim=True)  # [m, 1]
    d = (z - c) / temperature  # [m, V] = log p + log S0 ≤ 0, never materialised
    e = d.exp()
    d64, e64 = d.double(), e.double()
    S0, S1, S2 = e64.sum(-1), (e64 * d64).sum(-1), (e64 * d64 * d64).sum(-1)  # [m] each
    log_S0 = S0.log()
    mean_d = S1 / S0  # E_p[d] = −H + log S0
    varentropy = (S2 / S0 - mean_d.square()).clamp_min(0.0)
    token_logp = d.gather(-1, targets[:, None]).squeeze(-1).double() - log_S0  # [m]
    logp_eos = d[:, eos].double() - log_S0[:, None]  # [m, k]
    stop_term = -(logp_eos.exp() * logp_eos).sum(-1)
    return token_logp.float(), (log_S0 - mean_d).float(), varentropy.float(), stop_term.float()


def _compiled():
    global _kernel
    if _kernel is None:
        _kernel = torch.compile(_stats, dynamic=True, fullgraph=True)
    return _kernel


def chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, eos: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Token log p, entropy, varentropy and the stop ids' entropy share of a chunk of logits.

    Naive equivalent: ``logp = log_softmax(logits.float() / T, -1)``; ``token_logp =
    logp.gather(-1, targets)``; ``H = −(p·logp).sum(-1)``; ``Var = (p·(logp + H)²).sum(-1)``;
    ``stop = −(p[:, eos]·logp[:, eos]).sum(-1)`` (``chunks.token_stats``; the tests
    compare both with float64 logits at V = 3, 1021, 49152, 50257, 128257, 151936, 262144 and
    262147, and a row of equal logits with log V).

    Parameters
    ----------
    logits : Tensor [m, V], any float dtype (the LM head's output; upcast to fp32 inside)
    targets : LongTensor [m]
    eos : LongTensor [k]  stop ids
    temperature : Tensor [1] float32, on the logits' device

    Returns
    -------
    (token_logp, entropy, varentropy, stop_term), each float32 [m]; None when ``torch.compile``
    is unavailable or failed on this device (the caller runs its eager path). Non-finite logits
    give non-finite statistics (the caller checks and reports them).
    """
    device = logits.device.type
    if device in _failed:
        return None
    m = logits.shape[0]
    if m == 1:  # dynamo specialises sizes of 1: pad to two rows rather than compile again
        logits, targets = logits.repeat(2, 1), targets.repeat(2)
    try:
        with torch.autocast(device, enabled=False), warnings.catch_warnings():  # fp32/fp64 by design
            # inductor's first import warns about torch's own deprecated torch.jit.script_method
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            out = _compiled()(logits, targets, eos, temperature)
    except torch.cuda.OutOfMemoryError:  # the eager path would need more memory, not less
        raise
    except Exception as e:  # no C++ compiler, no Triton, an unsupported backend or platform
        _failed.add(device)
        log.debug(
            "fused chunk statistics unavailable on %s (%s: %s); using the eager path", device, type(e).__name__, e
        )
        return None
    return tuple(x[:m] for x in out) if m == 1 else out
