"""Peak memory and time of LogProbEngine.score vs the bare body forward and a plain logits forward.

Each mode runs in its own process (peak RSS is per process); the peak is reset after the model
is loaded (``/proc/self/clear_refs``), so it measures the forward, on top of the resident weights.

    python benchmarks/engine_memory.py --rows 16 --prompt 64 --completion 512

Modes: ``body`` (model.base_model, hidden states only: the floor), ``logits`` (``model(**batch)
.logits``, the common approach's first step), ``score`` (``LogProbEngine.score``). One JSON line
per measurement on stdout; a table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def run_mode(args) -> dict:
    import torch

    from isdelta.engine import LogProbEngine, Rollouts, load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tok = load_model(args.model)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (args.rows, args.prompt), generator=g)
    comp = torch.randint(3, V, (args.rows, args.completion), generator=g)
    ro = Rollouts.from_tensors(prompt, torch.ones_like(prompt), comp, torch.ones_like(comp),
                               eos_token_ids=tok.eos_token_id)
    batch = dict(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                 position_ids=ro.position_ids(), use_cache=False)
    engine = LogProbEngine(progress=False, token_budget=10**9)

    def once():
        with torch.no_grad():
            if args.mode == "body":
                return model.base_model(**batch)[0]
            if args.mode == "logits":
                return model(**batch).logits
            return engine.score(model, ro).logp

    once()  # warm-up (also runs the engine's one-time head check)
    gc.collect()
    times = []
    base = rss_kib("VmRSS")
    reset_peak()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
        del out
        gc.collect()
    peak = rss_kib("VmHWM")
    times.sort()
    return {"mode": args.mode, "model": args.model, "rows": args.rows, "prompt": args.prompt,
            "completion": args.completion, "dtype": str(model.dtype), "device": "cpu",
            "threads": torch.get_num_threads(), "median_s": times[len(times) // 2], "times_s": times,
            "rss_base_mib": base / 1024, "rss_peak_mib": peak / 1024,
            "peak_over_base_mib": (peak - base) / 1024, "cpu": platform.processor() or platform.machine(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mode", choices=["body", "logits", "score"])
    ap.add_argument("--modes", default="body,logits,score,body,logits,score")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)), flush=True)
        return
    results = []
    for mode in args.modes.split(","):  # interleaved A/B: each mode in a fresh process
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "modes")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.exit(out.stderr)
        line = out.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        results.append(json.loads(line))
    best = {}
    for r in results:
        b = best.setdefault(r["mode"], r)
        if r["median_s"] < b["median_s"]:
            best[r["mode"]]["median_s"] = r["median_s"]
        b["rss_peak_mib"] = min(b["rss_peak_mib"], r["rss_peak_mib"])
        b["peak_over_base_mib"] = min(b["peak_over_base_mib"], r["peak_over_base_mib"])
    body, logits = best["body"], best["logits"]
    print(f"\n{args.rows} rows x ({args.prompt} prompt + {args.completion} completion) tokens, {args.model}")
    print("| mode | median s | x body | x logits | peak RSS MiB | x body | x logits | peak-base MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for m in ("body", "logits", "score"):
        r = best[m]
        print(f"| {m} | {r['median_s']:.2f} | {r['median_s'] / body['median_s']:.2f} | "
              f"{r['median_s'] / logits['median_s']:.2f} | {r['rss_peak_mib']:.0f} | "
              f"{r['rss_peak_mib'] / body['rss_peak_mib']:.2f} | {r['rss_peak_mib'] / logits['rss_peak_mib']:.2f} | "
              f"{r['peak_over_base_mib']:.0f} |")


if __name__ == "__main__":
    main()
