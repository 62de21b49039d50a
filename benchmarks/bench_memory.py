"""Peak memory of each stage against the model's own floor (weights, gradients, optimizer state).

Each (model, counted tokens, stage) runs in a fresh process: load the model, build what the stage
is handed (a p0 copy, a direction), then reset the peak (``/proc/self/clear_refs`` on CPU,
``torch.cuda.reset_peak_memory_stats`` on GPU), run the stage once and read the peak
(``VmHWM`` / ``max_memory_allocated``). The stage's own cost is peak − memory before it; its
floor is what it must hold whatever the engine does:

    score, tokens   0 (no graph; the models are already there)
    update          gradients W + AdamW's two moments 2W  (p0 kept by the caller: reference=)
    probe           the gradient W  (the direction θ1 − θ0 is built before)

and the excess over that floor is the engine's working memory: the body's activations and the
LM head's chunks. One micro-batch holds every counted token (``token_budget`` = rows × width), so
the excess is the most one micro-batch of that size can take. The rows are random token ids of
the model's vocabulary: 16-token prompts and 256-token completions without a stop token.

    python benchmarks/bench_memory.py                       # SmolLM2 and Gemma-3-270M, 512 and 2048
    python benchmarks/bench_memory.py --models smollm2-135m-instruct --tokens 2048 --stages update
    python benchmarks/bench_memory.py --no-recompute        # adds the update without recomputation

One JSON line per measurement in ``benchmarks/results/memory_<device>.jsonl``; a markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PROMPT, COMPLETION = 16, 256
GIB = 2**30


def _rss_hwm() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda k: int(fields[k].split()[0]) * 1024
    return kib("VmRSS"), kib("VmHWM")


def _reset_peak(device: str) -> int:
    """Reset the peak counter; the memory in use now (bytes)."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_hwm()[0]


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_hwm()[1]


def _rollouts(tok, n_tokens: int, seed: int):
    import torch

    from isdelta.engine import Rollouts

    g = torch.Generator().manual_seed(seed)
    rows = max(1, n_tokens // COMPLETION)
    specials = set(tok.all_special_ids)
    ok = torch.tensor([i for i in range(min(len(tok), 32000)) if i not in specials])
    draw = lambda n: ok[torch.randint(len(ok), (n,), generator=g)].tolist()
    prompts = [draw(PROMPT) for _ in range(rows // 2 or 1)]
    comps = [draw(COMPLETION) for _ in range(rows)]
    G = rows // len(prompts)
    return Rollouts.from_token_lists(
        [prompts[i // G] for i in range(rows)], comps, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ), rows


def child(model_name: str, n_tokens: int, stage: str, recompute: bool) -> dict:
    """One measurement in this process."""
    import numpy as np
    import torch

    from isdelta.engine import EngineConfig, LogProbEngine, load_model

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(model_name, device=device)
    with torch.no_grad():  # page in weights loaded from a memory-mapped safetensors file
        for p in model.parameters():
            p.add_(0)
    W = sum(p.numel() * p.element_size() for p in model.parameters())
    ro, rows = _rollouts(tok, n_tokens, 0)
    budget = rows * (PROMPT + COMPLETION)
    ecfg = EngineConfig(token_budget=budget, progress=False, recompute=recompute)
    floor, extra = 0, {}
    if stage == "update":
        from isdelta.training import update

        p0 = copy.deepcopy(model)
        rewards = np.tile([1.0, 0.0], rows // 2 + 1)[:rows]
        before = _reset_peak(device)
        t = time.perf_counter()
        update(model, loss="reinforce", rollouts=ro, rewards=rewards, optimizer="adamw", lr=1e-6,
               engine_config=ecfg, progress=False, reference=p0)  # fmt: skip
        floor = 3 * W
    elif stage == "probe":
        from isdelta.probes import gradient_delta

        direction = {n: torch.randn_like(p) * 1e-4 for n, p in model.named_parameters()}
        scores0 = LogProbEngine(ecfg).score(model, ro).to_numpy()
        before = _reset_peak(device)
        t = time.perf_counter()
        gradient_delta(model, ro, direction, engine_config=ecfg, scores0=scores0)
        floor = W
    elif stage == "tokens":
        from isdelta.tokens import compare_tokens

        model1 = copy.deepcopy(model)
        before = _reset_peak(device)
        t = time.perf_counter()
        compare_tokens(model, model1, ro, token_budget=budget)
        extra["note"] = "p1 = a copy of p0"
    else:
        before = _reset_peak(device)
        t = time.perf_counter()
        LogProbEngine(ecfg).score(model, ro)
    seconds = time.perf_counter() - t
    peak = _peak(device)
    V = model.get_output_embeddings().weight.shape[0]
    return {
        "model": model_name,
        "stage": stage,
        "recompute": recompute,
        "counted_tokens": int(ro.mask(True).sum()),
        "rows": rows,
        "vocab": V,
        "device": device,
        "weights_bytes": W,
        "before_bytes": before,
        "peak_bytes": peak,
        "stage_bytes": peak - before,
        "floor_bytes": floor,
        "excess_bytes": peak - before - floor,
        "seconds": seconds,
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--stages", nargs="+", default=["score", "update", "probe", "tokens"])
    ap.add_argument("--no-recompute", action="store_true", help="also measure the update without recomputation")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "TOKENS", "STAGE", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, n, s, r = args.child
        print("RESULT " + json.dumps(child(m, int(n), s, r == "1")))
        return
    from benchmarks.provenance import commit, device_name

    sha, dirty = commit("isdelta", "benchmarks/bench_memory.py")
    run = time.strftime("%Y%m%dT%H%M%S")
    jobs = [(m, n, s, True) for m in args.models for n in args.tokens for s in args.stages]
    if args.no_recompute:
        jobs += [(m, n, "update", False) for m in args.models for n in args.tokens]
    rows = []
    for m, n, s, r in jobs:
        cmd = [sys.executable, __file__, "--child", m, str(n), s, "1" if r else "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{m} {n} {s}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        res = {"run_id": run, "commit": sha, "dirty": dirty, **json.loads(line[7:])}
        res["device_name"] = device_name(res["device"])
        rows.append(res)
        print(f"{m} {n} {s} recompute={r}: peak {res['peak_bytes'] / GIB:.2f} GiB", file=sys.stderr)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with (RESULTS / f"memory_{res['device']}.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
    if not rows:
        return
    head = f"{rows[0]['device_name']}, run {run}, commit {sha}{' (dirty)' if dirty else ''}"
    lines = [
        head,
        "",
        "| model | V | weights W GiB | counted tokens | stage | recompute | before GiB | peak GiB | stage GiB "
        "| floor GiB | excess GiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = lambda k, r=r: f"{r[k] / GIB:.2f}"
        lines.append(
            f"| {r['model']} | {r['vocab']} | {g('weights_bytes')} | {r['counted_tokens']} | {r['stage']} "
            f"| {'yes' if r['recompute'] else 'no'} | {g('before_bytes')} | {g('peak_bytes')} | {g('stage_bytes')} "
            f"| {g('floor_bytes')} | **{g('excess_bytes')}** | {r['seconds']:.1f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
