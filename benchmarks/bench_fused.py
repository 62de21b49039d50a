"""Where ``EngineConfig(fused="auto")`` should start compiling: the compile cost against the time
the fused chunk statistics save per logit (``isdelta/engine/fused.py``, ``FUSE_MIN_LOGITS``).

1. Compile cost: a fresh process times its first ``fused.chunk_stats`` call (import of dynamo and
   inductor, tracing, code generation, the C++ or Triton compile) minus a steady call, once with
   an empty inductor cache (``cold``: the first run on a machine) and once more with the cache
   that run left (``warm``: every later run; inductor keeps it under /tmp/torchinductor_<user>).
2. Saving: one [m, V] chunk of random logits (m = the engine's chunk, 2**23 // V rows) through
   the eager statistics (``chunks.token_stats``) and the fused ones, interleaved, medians.

Break-even = compile cost / saving per logit: the logits (counted tokens × V) a score call must
reach for compiling to pay within that call.

    python benchmarks/bench_fused.py --threads 1,2                    # CPU, about 2 min
    python benchmarks/bench_fused.py --device cuda --vocab 49152,128256

One JSON line per measurement in ``benchmarks/results/fused_<device>.jsonl``; a markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _chunk(V: int, device: str, seed: int = 0):
    """Random fp32 logits [m, V] of the engine's default chunk height, targets [m], one stop id."""
    import torch

    from isdelta.engine import EngineConfig

    g = torch.Generator().manual_seed(seed)
    m = max(2, EngineConfig().chunk_elems // V)
    z = (torch.randn(m, V, generator=g) * 3).to(device)
    targets = torch.randint(0, V, (m,), generator=g).to(device)
    return z, targets, torch.tensor([2], device=device), torch.ones(1, device=device)


def compile_probe(args) -> None:
    """Child process: seconds of the first fused call and of a steady one, as one JSON line."""
    import torch

    torch.set_num_threads(args.threads_one)
    from isdelta.engine.fused import chunk_stats

    z, t, eos, temp = _chunk(args.vocab_one, args.device)
    times = []
    for _ in range(3):
        _sync(args.device)
        t0 = time.perf_counter()
        out = chunk_stats(z, t, eos, temp)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        if out is None:
            sys.exit("torch.compile failed here; see the debug log of isdelta.engine.fused")
    print(json.dumps({"first_s": times[0], "steady_s": min(times[1:])}))


def compile_cost(args, threads: int, cache: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    cmd = [sys.executable, __file__, "--probe", "--device", args.device, "--threads", str(threads)]
    cmd += ["--vocab", str(args.vocab[0])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode:
        sys.exit(f"compile probe failed:\n{out.stderr[-2000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["compile_s"] = rec["first_s"] - rec["steady_s"]
    return rec


def saving(args, V: int, threads: int) -> dict:
    """Median seconds of one chunk, eager and fused, over interleaved repeats."""
    import torch

    from isdelta.engine.chunks import token_stats
    from isdelta.engine.fused import chunk_stats
    from isdelta.engine.transform import LogitTransform

    torch.set_num_threads(threads)
    z, t, eos, temp = _chunk(V, args.device)
    rows = torch.zeros_like(t)
    eager = lambda: token_stats(z.clone(), t, rows, eos, LogitTransform())
    calls = {"eager": eager, "fused": lambda: chunk_stats(z, t, eos, temp)}
    copy = lambda: z.clone()  # the eager path frees its input: time the copy and subtract it
    times: dict[str, list[float]] = {k: [] for k in (*calls, "copy")}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            for k, fn in (*calls.items(), ("copy", copy)):
                _sync(args.device)
                t0 = time.perf_counter()
                fn()
                _sync(args.device)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
    n = z.numel()
    eager_s = med["eager"] - med["copy"]
    return {
        "rows": z.shape[0],
        "eager_s": eager_s,
        "fused_s": med["fused"],
        "ns_saved_per_logit": (eager_s - med["fused"]) / n * 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1", help="comma list of torch thread counts")
    ap.add_argument("--vocab", default="49152,50257,128257,151936", help="comma list of vocabulary sizes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.vocab = [int(v) for v in args.vocab.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                f"bench_fused.py --device {args.device} needs a CUDA GPU; this torch ({torch.__version__}) sees none."
            )
    if args.probe:
        args.threads_one, args.vocab_one = threads[0], args.vocab[0]
        return compile_probe(args)
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fused_{args.device.split(':')[0]}.jsonl"
    run = time.strftime("%Y%m%dT%H%M%S")
    from benchmarks.provenance import device_name

    cpu = device_name(args.device)
    meta = {"run_id": run, "device": args.device, "cpu": cpu, "torch": torch.__version__}
    lines = [
        f"{args.device} ({cpu}), torch {torch.__version__}, run {run}",
        "",
        "| threads | compile cold s | compile warm s | V | rows | eager ms | fused ms | × | ns saved / logit "
        "| break-even logits (warm) | tokens at V | break-even (cold) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with out.open("a") as f:
        for th in threads:
            with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
                cold, warm = compile_cost(args, th, cache), compile_cost(args, th, cache)
            for V in args.vocab:
                s = saving(args, V, th)
                rec = dict(
                    meta, threads=th, V=V, compile_cold_s=cold["compile_s"], compile_warm_s=warm["compile_s"], **s
                )
                f.write(json.dumps(rec) + "\n")
                per = s["ns_saved_per_logit"] * 1e-9
                be_warm, be_cold = warm["compile_s"] / per, cold["compile_s"] / per
                lines.append(
                    f"| {th} | {cold['compile_s']:.1f} | {warm['compile_s']:.1f} | {V} | {s['rows']} "
                    f"| {s['eager_s'] * 1e3:.1f} | {s['fused_s'] * 1e3:.1f} | {s['eager_s'] / s['fused_s']:.1f} "
                    f"| {s['ns_saved_per_logit']:.2f} | {be_warm:.2e} (2^{math.log2(be_warm):.1f}) | {be_warm / V:.0f} "
                    f"| {be_cold:.2e} |"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
