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

3. ``--models``: the engine on real models, both paths, against its floor and its peer, in one
   fresh process (glibc malloc fixed as in ``bench_engine.py``), models, shapes and modes
   interleaved round by round so that drifts in machine load hit all alike:
   (b) ``LogProbEngine.score`` with ``fused="on"`` (compiled in the untimed warm-up, whose
   time is recorded), (h) the same with ``fused="off"``, (f) body + LM head at the completion
   positions in the engine's chunks (the floor), (d) TRL's ``selective_log_softmax`` +
   ``entropy_from_logits`` on ``logits_to_keep`` logits (its unfused GRPO scoring); the modes
   are ``bench_engine.py``'s own. Ratios are medians of the ratios within each round. The
   warm-up checks (b), (h) and (d) agree on log p and entropy. Models by name, through
   ``isdelta.engine.load_model`` (a builtin such as ``smollm2-135m-instruct``, a local HF
   folder, a hub id already in the HF cache).

    python benchmarks/bench_fused.py --threads 1,2                    # CPU, about 2 min
    python benchmarks/bench_fused.py --device cuda --vocab 49152,128256
    python benchmarks/bench_fused.py --models smollm2-135m-instruct,gemma-3-270m --shapes 4x64+256 --threads 1

One JSON line per measurement in ``benchmarks/results/fused_<device>.jsonl`` (``--models``:
``fused_models_<device>.jsonl``); a markdown table on stdout.
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


def _engine_modes(model, tok, x, device: str) -> dict:
    """name -> fn(x, clock) for modes b, h, f, d on one model and shape (bench_engine's f and d)."""
    from types import SimpleNamespace

    from benchmarks.bench_engine import Modes
    from isdelta.engine import EngineConfig, LogProbEngine

    base = SimpleNamespace(chunk_elems=None, fused="on", naive_positions=0)
    modes = Modes(model, tok, base)
    budget = max(16384, x.ro.n_rows * x.ro.input_ids.shape[1])  # one micro-batch, like every other mode
    out = {}
    for m, fused in (("b", "on"), ("h", "off")):
        engine = LogProbEngine(EngineConfig(progress=False, token_budget=budget, fused=fused))

        def score(x, clock, engine=engine):
            s = engine.score(model, x.ro)
            return {"logp": s.token_logp, "entropy": s.token_entropy}

        out[m] = score
    out["f"] = modes.f
    skip = modes.setup("d", x)
    if skip is None:
        out["d"] = modes.d
    else:
        print(f"[bench_fused] (d) skipped: {skip}", file=sys.stderr)
    return out


def engine_ratios(args) -> None:
    """``--models``: see the module docstring, part 3. Runs in a child process (fresh allocator)."""
    import torch

    from benchmarks.bench_engine import Clock, load, make_data, measure, parse_shape
    from benchmarks.provenance import commit, device_name
    from isdelta.engine import SplitLM

    threads = int(args.threads.split(",")[0])
    torch.set_num_threads(threads)
    cuda, clock = args.device.startswith("cuda"), Clock(args.device.startswith("cuda"))
    sha, dirty = commit("isdelta/engine", "benchmarks/bench_fused.py")
    meta = dict(
        run_id=time.strftime("%Y%m%dT%H%M%S"), device=args.device, cpu=device_name(args.device), dtype=args.dtype,
        threads=threads, torch=torch.__version__, commit=sha, dirty=dirty,
    )  # fmt: skip
    cases = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, tok = load(name, "", args.dtype, args.device)
        V = SplitLM.of(model).vocab_size
        print(f"[bench_fused] {name}: V = {V}, loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for shape in args.shapes.split(","):
            x = make_data(model, tok, parse_shape(shape), 0, args.device)
            cases.append(dict(model=name, V=V, shape=shape, x=x, fns=_engine_modes(model, tok, x, args.device)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"fused_models_{args.device.split(':')[0]}.jsonl"
    with path.open("a") as f:
        write = lambda rec: f.write(json.dumps({**meta, **rec}) + "\n") or f.flush()
        for c in cases:  # warm-up: the compile happens in the first (b) call; the outputs are checked
            outs = {}
            for m, fn in c["fns"].items():
                outs[m], rec = measure(fn, c["x"], clock, cuda)
                c.setdefault("warmup", {})[m] = rec["seconds"]
                write(dict(model=c["model"], V=c["V"], shape=c["shape"], mode=m, round=-1, seconds=rec["seconds"]))
            c["check"] = _agreement(outs)
            write(dict(model=c["model"], V=c["V"], shape=c["shape"], check=c["check"]))
        for r in range(args.repeats):
            for c in cases:
                for m, fn in c["fns"].items():
                    _, rec = measure(fn, c["x"], clock, cuda)
                    c.setdefault("times", {}).setdefault(m, []).append(rec["seconds"])
                    c.setdefault("load", []).append(rec["loadavg"][0])
                    write(
                        dict(model=c["model"], V=c["V"], shape=c["shape"], mode=m, round=r, seconds=rec["seconds"])
                        | {k: rec[k] for k in ("cpu_s", "loadavg", "cpu_pressure_avg10")}
                    )
    print(ratio_table(cases, meta, args.repeats))
    print(f"\nwritten to {path}")


def _agreement(outs: dict) -> dict:
    """Max |Δ| / max(1, |value|) of log p and entropy of (h) and (d) against (b)."""
    ref = {q: outs["b"][q].double() for q in ("logp", "entropy")}
    return {
        m: max(float(((o[q].double() - ref[q]).abs() / ref[q].abs().clamp_min(1)).max()) for q in ref)
        for m, o in outs.items()
        if m != "b" and o is not None
    }


def ratio_table(cases: list[dict], meta: dict, repeats: int) -> str:
    """Medians per mode and the medians of the within-round ratios; which path "auto" takes."""
    import torch

    from isdelta.engine.fused import MONITOR_STEPS, worth_fusing

    dev = torch.device(meta["device"])
    head = (
        f"{meta['device']} ({meta['cpu']}), {meta['dtype']}, {meta['threads']} thread(s), torch {meta['torch']}, "
        f"commit {meta['commit']}{' + uncommitted changes' * meta['dirty']}, run {meta['run_id']}; {repeats} "
        "interleaved rounds. Seconds are medians; ratios are medians of the ratios within each round."
    )
    lines = [
        head,
        "",
        "| model (V) | N × (P + C) | (f) body + head s | (b) fused s | (h) eager s | (d) TRL s | (b) / (f) "
        "| (h) / (f) | (b) / (d) | (h) / (d) | max rel Δ vs (b) | auto: one call / a monitor step | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        t = c["times"]
        n_logits = c["x"].ro.n_rows * c["x"].C * c["V"]
        one, step = worth_fusing(n_logits, dev), worth_fusing(n_logits, dev, calls=2 * MONITOR_STEPS)
        sec = [f"{statistics.median(t[m]):.3f}" if m in t else "—" for m in "fbhd"]
        ratios = [_ratio(t, a, b) for a, b in ("bf", "hf", "bd", "hd")]
        delta = ", ".join(f"({m}) {v:.1e}" for m, v in c["check"].items())
        shape = c["shape"].replace("x", " × (").replace("+", " + ") + ")"
        lines.append(
            f"| {c['model']} ({c['V']}) | {shape} | {' | '.join(sec)} | {' | '.join(ratios)} | {delta} "
            f"| {'fused' if one else 'eager'} / {'fused' if step else 'eager'} "
            f"| {min(c['load']):.1f}–{max(c['load']):.1f} |"
        )
    first = cases[0]
    lines += [
        "",
        f"(b)'s first call, {first['model']} at {first['shape']}, compiled the kernel: "
        f"{first['warmup']['b']:.1f} s against {statistics.median(first['times']['b']):.2f} s for a steady call.",
    ]
    return "\n".join(lines)


def _ratio(times: dict, a: str, b: str) -> str:
    """Median over rounds of time(a) / time(b) within the round."""
    if a not in times or b not in times:
        return "—"
    return f"{statistics.median(x / y for x, y in zip(times[a], times[b])):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1", help="comma list of torch thread counts")
    ap.add_argument("--vocab", default="49152,50257,128257,151936", help="comma list of vocabulary sizes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", help="comma list of models (load_model names): the engine ratios, part 3")
    ap.add_argument("--shapes", default="4x64+256", help="with --models: comma list of NxP+C")
    ap.add_argument("--dtype", default="float32", help="with --models: the models' dtype")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.models and not os.environ.get("ISDELTA_BENCH_FUSED_CHILD"):  # a fresh process, malloc fixed
        from benchmarks.bench_engine import MALLOC_ENV

        env = dict(os.environ, ISDELTA_BENCH_FUSED_CHILD="1", **MALLOC_ENV["fixed"])
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env, cwd=ROOT, check=False).returncode)
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
    if args.models:
        return engine_ratios(args)
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
