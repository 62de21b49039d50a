"""What the verl adapter costs per monitored step, with verl's real actor worker and SmolLM2.

Runs in ``.venv-verl`` (``make verl-setup``) on the CPU, as ``tests/with_verl`` does (verl's FSDP2
actor worker in this process, the CPU platform of ``tests/with_verl/cpu_platform.py``; Ray and the
rollout server are not run). Per step: verl's old-log-prob pass (p0: log-probs and entropies,
which the adapter keeps), verl's actor update (GRPO advantages, PPO loss, AdamW), then what the
adapter adds: the same pass on the updated actor (p1) and the estimate on the driver::

    .venv-verl/bin/python benchmarks/bench_verl.py                 # 8 prompts × 4 × 128 tokens, 3 steps
    .venv-verl/bin/python benchmarks/bench_verl.py --new-tokens 256 --steps 2

Writes ``results/verl_cost.jsonl`` (one line per step) and prints the table of
``benchmarks/README.md`` ("verl: the cost of a monitored step").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def load_conftest():
    """tests/with_verl/conftest.py by path (it sets verl's CPU platform before verl is imported;
    verl's wheel ships a ``tests`` package that shadows this checkout's)."""
    spec = importlib.util.spec_from_file_location("verl_cpu_conftest", ROOT / "tests" / "with_verl" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rollouts(model, tok, n_prompts: int, n: int, new_tokens: int) -> dict:
    """``n`` samples per prompt of the shipped arithmetic prompts, in the layout of ``sampled``
    (tests/with_verl/conftest.py), with the sampler's log-probs as q."""
    import torch

    from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, sample

    recs = [json.loads(x) for x in (ROOT / "isdelta" / "data" / "math.jsonl").read_text().splitlines() if x.strip()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in recs[:n_prompts]]
    s = sample(
        model, tok, prompts, num_samples=n, transform=LogitTransform(), max_new_tokens=new_tokens, progress=False
    )
    ro = s.rollouts
    scores = LogProbEngine(EngineConfig(progress=False)).score(model, ro)
    mask = scores.mask
    return {
        "prompts": ro.prompt_ids,
        "prompt_mask": ro.attention_mask[:, : ro.prompt_len].long(),
        "responses": torch.where(mask, ro.completion_ids, torch.full_like(ro.completion_ids, tok.pad_token_id)),
        "response_mask": mask.long(),
        "rollout_log_probs": scores.token_logp.float(),
        "uid": [f"prompt-{g}" for g in ro.group.tolist()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="responses per prompt (rollout.n)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    conf = load_conftest()
    import torch
    import torch.distributed as dist
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.metric import reduce_metrics
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from isdelta.engine import load_model
    from isdelta.integrations.verl import EntropyDeltaMixin

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    model_dir = Path(tempfile.mkdtemp(prefix="smollm2-hf-"))
    model.float().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = rollouts(model, tok, args.prompts, args.n, args.new_tokens)
    del model
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=0, world_size=1)
    config = conf.make_config(model_dir)
    a = config.actor_rollout_ref
    a.rollout.n, a.actor.ppo_mini_batch_size, a.actor.optim.lr = args.n, args.prompts, args.lr
    worker = ActorRolloutRefWorker(config=a, role="actor")
    worker.init_model()

    class Trainer(EntropyDeltaMixin, RayPPOTrainer):
        pass

    trainer = object.__new__(Trainer)
    trainer.config, trainer.actor_rollout_wg, trainer.tokenizer = config, worker, tok
    rows = []
    for step in range(1, args.steps + 1):
        trainer.global_steps = step
        batch = conf.make_data_proto(data)
        t0 = time.perf_counter()
        old, _ = trainer._compute_old_log_prob(batch)
        t_old = time.perf_counter() - t0
        old.batch.pop("entropys")
        batch = batch.union(old)
        mask = batch.batch["response_mask"]
        last = mask.sum(-1) - 1
        reward = torch.zeros(mask.shape)
        reward[torch.arange(len(last)), last] = torch.rand(len(last), generator=torch.Generator().manual_seed(step))
        adv, ret = core_algos.compute_grpo_outcome_advantage(reward, mask, index=batch.non_tensor_batch["uid"])
        batch.batch["advantages"], batch.batch["returns"] = adv, ret
        t0 = time.perf_counter()
        out = trainer._update_actor(batch)
        t_update_total = time.perf_counter() - t0
        metrics = reduce_metrics(out.meta_info["metrics"])
        res = trainer.isdelta_monitor().results[-1]
        t_isdelta = res.seconds  # the p1 pass on the actor + the estimate on the driver
        row = {
            "step": step,
            "rows": int(mask.shape[0]),
            "tokens": int(mask.sum()),
            "new_tokens": args.new_tokens,
            "old_log_prob_s": round(t_old, 3),
            "update_actor_s": round(t_update_total - t_isdelta, 3),
            "isdelta_s": round(t_isdelta, 3),
            "ratio_to_step": round(t_isdelta / (t_old + t_update_total - t_isdelta), 3),
            "delta_tok": metrics.get("entropy/delta_tok"),
            "valid": metrics.get("entropy/valid"),
            "valid_tok": metrics.get("entropy/valid_tok"),
            "threads": args.threads,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "verl_cost.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("old_log_prob_s", "update_actor_s", "isdelta_s", "ratio_to_step")
    }
    print(
        f"| SmolLM2-135M, {args.prompts} prompts × {args.n}, ≤ {args.new_tokens} tokens ({rows[0]['tokens']} counted) "
        f"| {med['old_log_prob_s']:.2f} | {med['update_actor_s']:.2f} | {med['isdelta_s']:.2f} | {med['ratio_to_step']:.2f} |"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
