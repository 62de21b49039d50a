"""Fresh rows: samples of p0 for a step's prompts, drawn independently of the step.

A trainer's step is computed from its batch, so the batch's rows are not independent of θ1: the
step raises the log-prob of each row it rewards and lowers the others, partly through that
row's own gradient, which no other sequence of p0 receives (its self-influence). ΔH and ΔH₁
read on those rows carry that term: on SmolLM2 GRPO steps of 48 rows ΔH₁ read there was 4–14× the
fresh rows' ΔH₁, ΔH 3.3–3.5× the realised ΔH on two batches of three, and at AdamW lr ≥ 1e-5 the
trained rows read a KL of 0.9–4.2 and were refused where fresh rows read the step
(``benchmarks/README.md``, "Trained rows or fresh rows"). The term is each row's share of the
step, so it should shrink roughly as 1/(rows per step); it is there at every batch size. Rows
sampled from p0 for the same prompts, with their own seed, are ordinary samples of p0 for the
realised step, so the monitor's importance-sampling estimate and the guard's first-order
prediction are unbiased on them.

Cost: ``num_samples`` completions per distinct prompt of the batch, with HF ``generate`` on the
training model under the sampler's transform (the engine's ``temperature``, ``top_k``, ``top_p``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from isdelta.engine.logprob import EngineConfig
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.sampling import sample

__all__ = ["distinct_prompts", "fresh_rows"]


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The distinct prompts of a batch ([N, P] ids and attention mask, any padding side) as
    token lists, in order of first appearance."""
    seen: dict[tuple[int, ...], None] = {}
    for ids, keep in zip(prompt_ids.tolist(), prompt_mask.bool().tolist()):
        seen.setdefault(tuple(t for t, k in zip(ids, keep) if k), None)
    return [list(p) for p in seen if p]


def fresh_rows(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    engine_config: EngineConfig,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    seed: int,
) -> Rollouts:
    """``num_samples`` completions of each prompt (token lists) from ``model`` as it is now (p0),
    under the engine's transform: a Rollouts the monitor and the guard read in place of the
    trained rows. The caller's RNG state is left as it was (:func:`isdelta.engine.sample`)."""
    if int(num_samples) < 2:
        raise ValueError(
            f"fresh rows: num_samples must be ≥ 2 per prompt (the estimators compare rows within a "
            f"prompt); got {num_samples!r}."
        )
    smp = sample(
        model,
        tokenizer,
        [list(p) for p in prompts],
        num_samples=int(num_samples),
        transform=engine_config.transform,
        max_new_tokens=int(max_new_tokens),
        seed=int(seed),
        eos_token_ids=list(eos_token_ids),
        progress=False,
    )
    return smp.rollouts
