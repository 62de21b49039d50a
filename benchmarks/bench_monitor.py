"""What the monitor's input checks add to a training step, against ``EntropyMonitor.after()`` (issue 30).

Per measured step the monitor runs the batch audit's checks on what it is handed
(``isdelta.engine.audit.check_batch``: the completion mask and the prompt padding, O(N·T) tensor
operations); on the first ``old_logp`` it would reuse it also checks the log-probs against the model
(one forward per row, once per monitor). Target: the per-step checks cost ≤ 2% of ``after()``.

Timed, in one process per model, interleaved (check, after, check, after, …) after untimed warm-ups:

  after          ``monitor.after(snapshot)``: the p1 forward on the step's rows and every estimate.
  check          ``check_batch`` on a correct batch, as the monitor calls it on every step.
  check_fix      the same on a batch whose mask drops the EOS (pad == eos, ``ids != pad_id``): the
                 findings are built and the corrected mask returned (a buggy trainer, every step).
  first_full     ``check_batch`` with ``old_logp`` and ``model=`` (the first batch, once; the
                 per-row forwards are the log-prob alignment check of the audit).
  before         ``monitor.before(batch)``: the checks, the layout and the p0 forward (context).

Data: P prompts × G samples, prompts of 16 to P_len tokens left-padded to P_len, completions of
C/8 to C tokens right-padded with pad == eos; 70% of the rows stop with EOS, the rest are cut at C.
Token ids are seeded random draws from the vocabulary (the cost does not depend on what they say).
p1 = p0 plus seeded noise (1e-4 × N(0, 1) per parameter), restored before every ``before``.

    python benchmarks/bench_monitor.py                               # SmolLM2 + the tests' tiny Llama, CPU
    python benchmarks/bench_monitor.py --model tiny-llama --repeats 3 # quick
    python benchmarks/bench_monitor.py --device cuda                 # on a GPU
    python benchmarks/bench_monitor.py --table benchmarks/results/monitor_cpu.jsonl   # a run's table again

``--fused-steps K`` measures something else: what a step costs with the monitor's fused-or-eager
decision (``isdelta/training/pinned.py``) against the one it had before, K steps of each,
interleaved (before-monitor step, pinned-monitor step, …), p0 restored before every step:

  per call   ``fused="auto"`` decided by each score call's own size (the monitor before the pin):
             eager whenever one call stays below ``FUSE_MIN_LOGITS`` (2**30 logits on CPU).
  pinned     decided once, at the first step, for ``MONITOR_STEPS`` steps of that size (p0 + p1),
             and kept: its step 0 includes the compile (``--inductor-cache cold``: an empty
             inductor cache, as on a new machine; ``warm``: whatever cache the machine has).

    python benchmarks/bench_monitor.py --model smollm2-135m-instruct --fused-steps 4 --prompts 8 --samples 4 --completion 192

One JSON line per measurement (device, dtype, threads, shapes, commit, every repeat's seconds and
the median) appended to ``benchmarks/results/monitor_<device>.jsonl``; a markdown table of medians
and ratios to ``after()`` is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

MODELS = ("smollm2-135m-instruct", "tiny-llama")
TINY_LLAMA = dict(  # the tests' tiny Llama (tests/conftest.py): 2 layers, V = 96, pad = eos = 2
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TARGET = 0.02  # the per-step checks' share of after()


def load(name: str, device: str, dtype: str):
    """(model, eos, pad): the builtin SmolLM2 (offline) or the tests' tiny Llama with random weights."""
    import torch

    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # as the tests do: distributions far from uniform
        return model.to(device=device, dtype=getattr(torch, dtype)), 2, 2
    from isdelta.engine import load_model

    model, tok = load_model(name, dtype=dtype, device=device)
    return model, tok.eos_token_id, tok.pad_token_id


def make_batch(V: int, eos: int, pad: int, P: int, G: int, P_len: int, C: int, seed: int, device):
    """A trainer's dict (TRL's keys) with the correct mask, and the same with the EOS-dropping mask."""
    import torch

    from isdelta.engine import completion_mask

    gen = torch.Generator().manual_seed(seed)
    N = P * G
    draw = lambda *shape: torch.randint(3, V, shape, generator=gen)  # ids 0-2: unk, bos, eos
    prompt_ids, prompt_mask = torch.full((N, P_len), pad), torch.zeros(N, P_len, dtype=torch.long)
    for p in range(P):
        n = int(torch.randint(16, P_len + 1, (1,), generator=gen))
        prompt_ids[p * G : (p + 1) * G, P_len - n :] = draw(n)
        prompt_mask[p * G : (p + 1) * G, P_len - n :] = 1
    completion_ids = torch.full((N, C), pad)
    lengths = torch.full((N,), C)
    for r in range(N):
        stops = bool(torch.rand(1, generator=gen) < 0.7)
        L = int(torch.randint(C // 8, C, (1,), generator=gen)) if stops else C
        completion_ids[r, :L] = draw(L)
        if stops:
            completion_ids[r, L - 1] = eos
        lengths[r] = L
    good = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask(completion_ids, eos, lengths).long(),
    }
    bad = {**good, "completion_mask": (completion_ids != pad).long()}  # pad == eos: each EOS dropped
    move = lambda b: {k: v.to(device) for k, v in b.items()}
    return move(good), move(bad)


def timed(fn, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_model(name: str, args, meta: dict, out) -> list[dict]:
    """Every measurement of one model, written to ``out``; the records."""
    import torch

    from isdelta.engine import EngineConfig, LogProbEngine, Rollouts
    from isdelta.engine.audit import check_batch
    from isdelta.engine.split import SplitLM
    from isdelta.training import EntropyMonitor

    cuda = args.device.startswith("cuda")
    model, eos, pad = load(name, args.device, args.dtype)
    V = SplitLM.of(model).vocab_size
    good, bad = make_batch(V, eos, pad, args.prompts, args.samples, args.prompt_len, args.completion, 0, args.device)
    p0 = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    noise = {k: 1e-4 * torch.randn(v.shape, generator=gen).to(v) for k, v in p0.items() if v.is_floating_point()}
    monitor = EntropyMonitor(model, engine_config=EngineConfig(progress=False, token_budget=args.token_budget))
    common = dict(eos_token_ids=monitor.eos_token_ids, pad_token_id=monitor.pad_token_id, vocab_size=V)

    def step() -> tuple[float, float]:
        model.load_state_dict(p0)
        t_before = timed(lambda: snaps.append(monitor.before(good)), cuda)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in noise:
                    v.add_(noise[k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random batch: the policy may call the step unreadable
            t_after = timed(lambda: results.append(monitor.after(snaps.pop())), cuda)
        return t_before, t_after

    snaps, results = [], []
    for _ in range(args.warmup):
        step()
        check_batch(**good, **common)
        check_batch(**bad, **common)
    model.load_state_dict(p0)
    rows = Rollouts.from_tensors(**good, eos_token_ids=eos)  # the trainer's log-probs, for the one-time check
    old = LogProbEngine(EngineConfig(progress=False)).score(model, rows).token_logp.float()
    first = timed(lambda: check_batch(**good, **common, per_token_logps=old, model=model), cuda)
    times: dict[str, list[float]] = {"before": [], "after": [], "check": [], "check_fix": [], "first_full": [first]}
    fixed = []
    for _ in range(args.repeats):
        t_before, t_after = step()
        times["before"].append(t_before)
        times["after"].append(t_after)
        times["check"].append(timed(lambda: check_batch(**good, **common), cuda))
        times["check_fix"].append(timed(lambda: fixed.append(check_batch(**bad, **common)), cuda))
    assert all(f.mask is not None for f in fixed)  # the correction path ran
    shape = {
        "model": name,
        "vocab": V,
        "prompts": args.prompts,
        "samples": args.samples,
        "rows": args.prompts * args.samples,
        "prompt_len": args.prompt_len,
        "completion": args.completion,
        "valid_steps": sum(r.valid for r in results if r is not None),
    }
    records = []
    for what, ts in times.items():
        rec = {**meta, **shape, "measure": what, "seconds": ts, "median": statistics.median(ts)}
        out.write(json.dumps(rec) + "\n")
        out.flush()
        records.append(rec)
    return records


class PerCall:
    """The monitor's engine before the pin (``training/pinned.py``): "auto" decided per call."""

    fused = None

    def __init__(self, config) -> None:
        from isdelta.engine import LogProbEngine

        self.engine = LogProbEngine(config)

    def score(self, model, rollouts, passes: int):
        return self.engine.score(model, rollouts)


def run_fused(name: str, args, meta: dict, out) -> list[dict]:
    """``--fused-steps``: seconds of before() + after() per step, per-call decision vs pinned."""
    import torch

    from isdelta.engine import EngineConfig, LogProbEngine, Rollouts
    from isdelta.engine.split import SplitLM
    from isdelta.training import EntropyMonitor

    cuda = args.device.startswith("cuda")
    model, eos, pad = load(name, args.device, args.dtype)
    lm = SplitLM.of(model)
    good, _ = make_batch(
        lm.vocab_size, eos, pad, args.prompts, args.samples, args.prompt_len, args.completion, 0, args.device
    )
    p0 = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    noise = {k: 1e-4 * torch.randn(v.shape, generator=gen).to(v) for k, v in p0.items() if v.is_floating_point()}
    cfg = EngineConfig(progress=False, token_budget=args.token_budget)
    monitors = {
        "per call": EntropyMonitor(model, engine_config=cfg),
        "pinned": EntropyMonitor(model, engine_config=cfg),
    }
    monitors["per call"]._engine = PerCall(cfg)
    rows = Rollouts.from_tensors(**{k: v[:2] for k, v in good.items()}, eos_token_ids=eos)
    LogProbEngine(cfg, fused="off").score(model, rows)  # untimed: the head check (once per model)
    times: dict[str, list[float]] = {k: [] for k in monitors}
    snaps, loads = [], []
    for _ in range(args.fused_steps):
        for k, mon in monitors.items():
            model.load_state_dict(p0)
            t_before = timed(lambda mon=mon: snaps.append(mon.before(good)), cuda)
            with torch.no_grad():
                for key, v in model.state_dict().items():
                    if key in noise:
                        v.add_(noise[key])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a random batch: the policy may call the step unreadable
                t_after = timed(lambda mon=mon: mon.after(snaps.pop()), cuda)
            times[k].append(t_before + t_after)
            loads.append(os.getloadavg()[0])
        print(f"[bench_monitor] step {len(times['pinned']) - 1}: {times}", file=sys.stderr, flush=True)
    model.load_state_dict(p0)
    n_logits = int(good["completion_mask"].sum()) * lm.vocab_size
    paths = {"per call": LogProbEngine(cfg).fuses(n_logits, lm.device), "pinned": monitors["pinned"].fused}
    shape = {"model": name, "vocab": lm.vocab_size, "rows": args.prompts * args.samples, "completion": args.completion}
    shape.update(tokens=int(good["completion_mask"].sum()), logits_per_call=n_logits, cache=args.inductor_cache)
    shape.update(load=[min(loads), max(loads)])
    records = []
    for k, ts in times.items():
        rec = {**meta, **shape, "measure": f"fused:{k}", "fused": bool(paths[k]), "seconds": ts}
        out.write(json.dumps(rec) + "\n")
        out.flush()
        records.append(rec)
    return records


def fused_table(records: list[dict]) -> str:
    """Per-step seconds of the two monitors: step 0, later steps, and the pinned one's ratio
    (median over the later steps of pinned ÷ per call within the step, the two ran back to back)."""
    rows = [
        "| model (V) | counted tokens (× 2 calls a step) | logits a call | monitor | path | step 0 s "
        "| later steps s (median) | later ÷ per call (median, range) | all steps s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in records):
        rs = {r["measure"].split(":")[1]: r for r in records if r["model"] == model}
        base = rs["per call"]["seconds"][1:]
        for k, r in rs.items():
            later = r["seconds"][1:] or r["seconds"]
            paired = [a / b for a, b in zip(later, base)] or [1.0]
            rows.append(
                f"| {model} ({r['vocab']}) | {r['tokens']} | {r['logits_per_call']:.2e} | {k} "
                f"| {'fused' if r['fused'] else 'eager'} | {r['seconds'][0]:.2f} | {statistics.median(later):.2f} "
                f"| {statistics.median(paired):.3f} ({min(paired):.2f}–{max(paired):.2f}) | {sum(r['seconds']):.1f} "
                f"| {r['load'][0]:.1f}–{r['load'][1]:.1f} |"
            )
    return "\n".join(rows)


def table(records: list[dict]) -> str:
    """Medians and ratios to after(), per model."""
    rows = ["| model | batch (P × G × C) | measure | median s | ÷ after() | target |", "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in records):
        rs = {r["measure"]: r for r in records if r["model"] == model}
        after = rs["after"]["median"]
        for what in ("after", "before", "check", "check_fix", "first_full"):
            r = rs[what]
            ratio = r["median"] / after
            goal = "≤ 2%: " + ("met" if ratio <= TARGET else "NOT met") if what.startswith("check") else "-"
            if what == "first_full":
                goal = "once per monitor"
            batch = f"{r['prompts']} × {r['samples']} × {r['completion']}"
            rows.append(f"| {model} | {batch} | {what} | {r['median']:.4g} | {_percent(ratio)} | {goal} |")
    return "\n".join(rows)


def _percent(ratio: float) -> str:
    """100% → "100%", 0.0137 → "1.4%", 3.7e-5 → "0.0037%": two significant digits below 10%."""
    return f"{100 * ratio:.0f}%" if ratio >= 0.1 else f"{100 * ratio:.2g}%"


def meta_info(args) -> dict:
    import torch
    import transformers

    from benchmarks.provenance import commit, device_name

    sha, dirty = commit("isdelta/engine", "isdelta/training", "benchmarks/bench_monitor.py")
    cpu = device_name(args.device)
    return {
        "run_id": time.strftime("%Y%m%dT%H%M%S"),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "commit": sha,
        "dirty": dirty,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "python": platform.python_version(),
        "repeats": args.repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (CPU)")
    ap.add_argument("--prompts", type=int, default=8, help="P prompts")
    ap.add_argument("--samples", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt block width (prompts of 16 to it)")
    ap.add_argument("--completion", type=int, default=128, help="completion block width C")
    ap.add_argument("--token-budget", type=int, default=16384, help="EngineConfig.token_budget")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fused-steps", type=int, help="measure K steps of the fused decision instead (see above)")
    ap.add_argument("--inductor-cache", default="warm", choices=["warm", "cold"], help="with --fused-steps")
    ap.add_argument("--out", help="JSON-lines file (default results/monitor_<device>.jsonl)")
    ap.add_argument("--table", type=Path, help="print the table of this JSON-lines file's run and exit")
    ap.add_argument("--run", help="with --table: a run_id (default: the file's latest)")
    args = ap.parse_args()
    if args.table:
        recs = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        run = args.run or recs[-1]["run_id"]
        recs = [r for r in recs if r["run_id"] == run]
        head = f"{recs[0]['cpu']}, {recs[0]['dtype']}, {recs[0]['threads']} threads, commit {recs[0]['commit']}"
        fused = [r for r in recs if r["measure"].startswith("fused:")]
        how = f"{len(fused[0]['seconds'])} steps" if fused else f"medians of {recs[0]['repeats']}"
        print(f"{head}{' (dirty)' * recs[0]['dirty']}, run {run} ({how})\n")
        print(fused_table(fused) if fused else table(recs))
        return
    if args.fused_steps and args.inductor_cache == "cold":  # before torch loads inductor
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench_monitor.py --device {args.device} needs a CUDA GPU; this torch sees none.")
    torch.set_num_threads(args.threads)
    meta = meta_info(args)
    path = Path(args.out) if args.out else RESULTS / f"monitor_{args.device.split(':')[0]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with open(path, "a") as out:
        for name in args.model.split(","):
            print(f"[bench_monitor] {name} on {args.device} ({meta['threads']} threads) …", file=sys.stderr, flush=True)
            records += run_fused(name, args, meta, out) if args.fused_steps else run_model(name, args, meta, out)
    if args.fused_steps:
        print(
            f"{meta['cpu']}, {args.dtype}, {meta['threads']} threads, run {meta['run_id']}, {args.fused_steps} steps\n"
        )
        print(fused_table(records))
    else:
        print(
            f"{meta['cpu']}, {args.dtype}, {meta['threads']} threads, run {meta['run_id']} (medians of {args.repeats})\n"
        )
        print(table(records))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
