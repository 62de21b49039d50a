"""The in-process update that makes p1 from p0 (DESIGN.md §7).

Both losses are sums over counted completion tokens divided by the TOTAL number of counted tokens
in the batch (a token-level mean, not a mean of per-sequence means)::

    sft        loss = −Σ_i Σ_t log p(x_it)         / n_tokens
    reinforce  loss = −Σ_i A_i Σ_t log p(x_it)     / n_tokens,   A_i = R_i − mean_{j ∈ prompt(i)} R_j

so each micro-batch's share of the gradient is known before the batch is split, and gradient
accumulation over micro-batches gives the same update whatever the token budget.

Data parallel (``distributed=True`` inside ``torch.distributed``): each rank holds its own rows;
n_tokens is the sum over ranks, each rank backpropagates its rows' share of the global loss, and
the gradients are summed across ranks (one all-reduce per step) before every optimizer step, so
every rank takes the same step as one process on all the rows. The engine calls the model's
body and head directly (not ``forward``), so ``DistributedDataParallel``'s hooks would not fire:
the reduction is explicit (:func:`isdelta.training.distributed.reduce_gradients`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from numbers import Real
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from isdelta.engine.logprob import EngineConfig, LogProbEngine
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.transform import is_integer
from isdelta.training.distributed import all_reduce_sum, reduce_gradients, world_size
from isdelta.training.params import ZeroUpdateError, change_norm, check_finite, grad_norm, reference_params

__all__ = [
    "LR_MAX",
    "LR_MIN",
    "MAX_STEPS",
    "UpdateResult",
    "ZeroUpdateError",
    "advantages",
    "check_lr_fits",
    "check_step_options",
    "update",
]

LossName = Literal["sft", "reinforce"]
OptimizerName = Literal["sgd", "adamw"]

# The optimizers apply lr in the weights' float32: torch cannot convert an lr above float32's
# largest value (3.4e38: "value cannot be converted to type float without overflow"), and one below
# its smallest normal value (1.2e-38) is a subnormal or 0 there. A step that changes no weight at
# all is refused after it is taken (ZeroUpdateError), whatever lr caused it.
LR_MIN = float(torch.finfo(torch.float32).tiny)
LR_MAX = float(torch.finfo(torch.float32).max)
# the steps re-use one batch (no resampling): past this p1 is a model fit to that batch, not an update
MAX_STEPS = 10_000


@dataclass(frozen=True)
class UpdateResult:
    """What one call of :func:`update` did.

    Attributes
    ----------
    loss : {"sft", "reinforce"}
    losses : tuple of float [steps]
        The loss at the start of each step (step s is evaluated at θ_s, before its update).
    grad_norms : tuple of float [steps]
        Global L2 norm of the accumulated gradient at each step.
    n_tokens : int
        Counted completion tokens of the batch (the loss's denominator).
    n_rows : int
    mean_reward : float or None
        Mean of the rewards (reinforce only).
    active_prompt_fraction : float or None
        Fraction of prompts with at least one nonzero advantage (reinforce only): prompts whose
        rewards are all equal contribute no gradient.
    param_change_norm : float
        ‖θ1 − θ0‖₂ over the trained parameters.
    lr : float
    optimizer : {"sgd", "adamw"}
    steps : int
    """

    loss: str
    losses: tuple[float, ...]
    grad_norms: tuple[float, ...]
    n_tokens: int
    n_rows: int
    mean_reward: float | None
    active_prompt_fraction: float | None
    param_change_norm: float
    lr: float
    optimizer: str
    steps: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["losses"], d["grad_norms"] = list(self.losses), list(self.grad_norms)
        return d


def advantages(rewards: np.ndarray, group: np.ndarray) -> np.ndarray:
    """A_i = R_i − mean of the rewards in row i's prompt group (the group-mean baseline); float64 [N]."""
    rewards = np.asarray(rewards, dtype=np.float64)
    _, inv = np.unique(group, return_inverse=True)
    sums, counts = np.bincount(inv, weights=rewards), np.bincount(inv)
    return rewards - (sums / counts)[inv]


def update(
    model: torch.nn.Module,
    *,
    loss: LossName,
    rollouts: Rollouts,
    rewards: np.ndarray | torch.Tensor | list[float] | None = None,
    optimizer: OptimizerName = "sgd",
    lr: float = 1e-4,
    steps: int = 1,
    engine_config: EngineConfig | None = None,
    progress: bool = True,
    distributed: bool = False,
    process_group=None,
    reference: torch.nn.Module | None = None,
) -> UpdateResult:
    """Train ``model`` in place on one batch: p0 → p1.

    The caller copies p0 first if it needs it. Every step re-uses the same batch (``steps > 1``
    takes several optimizer steps on it; the rollouts are not resampled), with one optimizer
    whose state lives only for this call. Dropout is off during the update (the engine scores in
    eval mode), so p1 is a deterministic function of p0 and the batch; the model is left in the
    mode it was in. A CPU copy of the trained parameters is held during the call to report
    ‖θ1 − θ0‖ (host memory, not device memory).

    Parameters
    ----------
    model : HF causal LM
        Its parameters with ``requires_grad=True`` are trained.
    loss : {"sft", "reinforce"}
        ``sft``: cross-entropy of the completions (reference responses) given the prompts.
        ``reinforce``: policy gradient on samples from p0 with the group-mean baseline.
        Both normalised by the total number of counted completion tokens (DESIGN.md §7).
    rollouts : Rollouts
        The batch. For ``reinforce`` its rows are the p0 samples, grouped by prompt.
    rewards : array [N], optional
        One reward per row (``reinforce`` only), e.g. from ``isdelta.training.REWARDS``.
    optimizer : {"sgd", "adamw"}
        Plain SGD (no momentum), or AdamW with ``weight_decay=0`` (decay would move the
        parameters without any signal from the batch).
    lr : float
        Learning rate, in [``LR_MIN``, ``LR_MAX``] (float32's normal range).
    steps : int
        Optimizer steps on the same batch, in [1, ``MAX_STEPS``].
    engine_config : EngineConfig, optional
        How log-probs are computed: the transform (for ``reinforce`` it must be the sampling
        transform; default temperature 1, no truncation), ``include_eos`` and ``token_budget``
        (the micro-batch size of gradient accumulation). ``requires_grad`` is forced on.
    progress : bool
        Show a progress bar over steps × micro-batches.
    distributed : bool
        ``rollouts`` (and ``rewards``) are this rank's shard of the batch: every rank of
        ``process_group`` calls ``update`` together; the loss is normalised by the global token
        count and the gradients are summed across ranks before each step (see the module doc).
        The result's counts, losses, norms and rewards are global. Without an initialised
        process group it is the one-process update.
    process_group : torch.distributed.ProcessGroup, optional
        Default: the world.
    reference : torch.nn.Module, optional
        An untouched copy of ``model`` (p0, which the caller keeps anyway): ‖θ1 − θ0‖ and the
        no-change check are taken against its parameters instead of a CPU copy made here, which
        would hold one more copy of the trained weights for the whole call.

    Returns
    -------
    UpdateResult

    Raises
    ------
    ZeroUpdateError
        Every advantage is zero, a step's gradient is zero, or the steps changed no weight (lr times
        the gradient below the weights' floating-point resolution): the update did not move p0.
    """
    _check_args(loss, optimizer, lr, steps, rollouts)
    cfg = replace(engine_config or EngineConfig(), requires_grad=True, progress=False)
    group = process_group if distributed and world_size(process_group) > 1 else False
    mask = rollouts.mask(cfg.include_eos)  # [N, C]
    weights, counts = _row_weights(loss, rewards, rollouts)
    # summed over ranks: tokens, rows, rows with an advantage, prompts with one, prompts, Σ reward
    n_tokens, n_rows, nonzero, active, n_prompts, reward_sum = _sum(group, [int(mask.sum()), *counts])
    n_tokens, n_rows = int(n_tokens), int(n_rows)
    if n_tokens == 0:
        raise ValueError(
            "the rollouts hold no counted completion token: nothing to train on. "
            "Check the completions (or include_eos=True for rows that stop at once)."
        )
    mean_reward = None if loss == "sft" else reward_sum / n_rows
    active = None if loss == "sft" else active / n_prompts
    if loss == "reinforce" and nonzero == 0:
        raise ZeroUpdateError(
            "every advantage is zero: the rewards have no variance within any prompt "
            f"(mean reward {mean_reward:.4g}), so the reinforce gradient is exactly zero and p1 = p0. "
            "ΔH would be 0 by construction, not by measurement. Use more samples per prompt, "
            "harder or easier prompts, or a graded reward."
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no parameter with requires_grad=True: nothing to train. "
            "Unfreeze the parameters to update (p.requires_grad_(True))."
        )
    for dtype in {p.dtype for p in params if p.is_floating_point()}:
        check_lr_fits(lr, dtype)
    engine = LogProbEngine(cfg)
    # rows with zero weight add nothing to the gradient; drop them before batching
    batches = engine.micro_batches(rollouts, mask & (weights != 0).to(mask.device)[:, None])
    theta0 = reference_params(model, params, reference)
    opt = _make_optimizer(optimizer, params, lr)
    was_training = model.training
    losses, grad_norms = [], []
    bar = tqdm(
        total=steps * len(batches),
        desc=f"update ({loss})",
        unit="batch",
        leave=False,
        disable=True if not progress else None,
    )
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            total, bad = _accumulate(engine, model, rollouts, weights, batches, n_tokens, bar)
            total, n_bad = _sum(group, [total, bad is not None])
            if n_bad:
                e = FloatingPointError(bad or "non-finite loss on another rank's rows (see that rank's message)")
                if not step:
                    raise e
                raise FloatingPointError(
                    f"step {step + 1} of {steps}: the model gives NaN/inf after step {step} (lr {lr:g}, "
                    f"gradient norm {grad_norms[-1]:.3g}) moved its weights too far. Lower lr."
                ) from e
            losses.append(total)
            if group is not False:
                reduce_gradients(params, group)
            grad_norms.append(grad_norm(params))
            opt.step()
    finally:
        model.train(was_training)
        bar.close()
        opt.zero_grad(set_to_none=True)  # free the gradient buffers
    check_finite(params, lr, grad_norms[-1])
    change = change_norm(params, theta0)
    if change == 0.0:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        raise ZeroUpdateError(
            f"the step changed no weight: lr {lr:g} times a gradient of norm {grad_norms[-1]:.3g} is below the "
            f"resolution of every {'/'.join(dtypes)} weight (2^-24 of its size in float32, 2^-8 in bfloat16), so "
            "p1 = p0 bit for bit and ΔH would be 0 by construction, not by measurement. Raise lr."
        )
    return UpdateResult(
        loss,
        tuple(losses),
        tuple(grad_norms),
        n_tokens,
        n_rows,
        mean_reward,
        active,
        change,
        float(lr),
        optimizer,
        int(steps),
    )


# ---------------------------------------------------------------------------- helpers
def _check_args(loss, optimizer, lr, steps, rollouts) -> None:
    """Raise ValueError/TypeError on bad options."""
    if loss not in ("sft", "reinforce"):
        raise ValueError(f"loss must be 'sft' or 'reinforce'; got {loss!r}.")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {optimizer!r}.")
    check_step_options(lr=lr, steps=steps)
    if not isinstance(rollouts, Rollouts):
        raise TypeError(
            f"rollouts must be an isdelta Rollouts; got {type(rollouts).__name__}. "
            "Build one with Rollouts.from_token_lists or Rollouts.from_tensors."
        )


def check_step_options(*, lr: float | None = None, steps: int | None = None) -> None:
    """ValueError unless each option given is in the range :func:`update` can step with:
    ``lr`` in [``LR_MIN``, ``LR_MAX``] (float32's normal range), ``steps`` in [1, ``MAX_STEPS``]."""
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, Real) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be > 0 and finite; got {lr!r}. (lr = 0 gives p1 = p0: ΔH = 0 by construction.)")
        if not LR_MIN <= lr <= LR_MAX:
            why = "overflows" if lr > LR_MAX else "rounds to a subnormal or 0 and the step leaves p1 = p0"
            raise ValueError(
                f"lr must lie in [{LR_MIN:.2g}, {LR_MAX:.2g}] (float32's normal range); got {lr:g}: the optimizer "
                f"applies it in the weights' float32, where it {why}. Typical learning rates are 1e-6 to 1e-3."
            )
    if steps is not None and (not is_integer(steps) or not 1 <= steps <= MAX_STEPS):
        raise ValueError(
            f"steps must be an integer in [1, {MAX_STEPS}]; got {steps!r}. The steps re-use one batch (no new "
            f"samples), each a forward and backward pass over all of it: past {MAX_STEPS} p1 is a model fit to "
            "that batch, not an update of p0. Take fewer steps, or a larger lr."
        )


def check_lr_fits(lr: float, dtype: torch.dtype | str) -> None:
    """FloatingPointError when ``lr`` overflows weights of ``dtype`` (float16: above 65504), in which
    the optimizer applies it."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    top = float(torch.finfo(dtype).max)
    if lr > top:
        name = str(dtype).removeprefix("torch.")
        raise FloatingPointError(
            f"lr {lr:g} overflows the {name} weights, in whose dtype the optimizer applies it (largest {top:g}). "
            f"Lower lr below {top:g}, or load the model in float32 or bfloat16."
        )


def _sum(group, values: list[float]) -> list[float]:
    """``values`` summed over the ranks of ``group`` (as they are when ``group`` is False)."""
    return [float(v) for v in values] if group is False else all_reduce_sum(values, group)


def _row_weights(loss, rewards, rollouts) -> tuple[torch.Tensor, list[float]]:
    """Per-row loss weights [N] (1 for sft, the advantage for reinforce) and the counts
    ``[rows, rows with a nonzero weight, prompts with one, prompts, Σ reward]`` (summed over
    ranks by the caller)."""
    N = rollouts.n_rows
    if loss == "sft":
        if rewards is not None:
            raise ValueError("rewards are only used by loss='reinforce'; pass rewards=None for sft.")
        return torch.ones(N, dtype=torch.float32), [N, N, 0, 0, 0.0]
    if rewards is None:
        raise ValueError("loss='reinforce' needs rewards: one float per rollout row [N].")
    R = np.asarray(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards, dtype=np.float64)
    if R.shape != (N,) or not np.isfinite(R).all():
        raise ValueError(
            f"rewards must be {N} finite floats (one per rollout row); got shape "
            f"{R.shape}{'' if R.shape != (N,) else ' with NaN/inf'}."
        )
    group = rollouts.group.cpu().numpy()
    A = advantages(R, group)
    # floating-point round-off of the group mean must not count as signal
    A[np.abs(A) <= 1e-12 * max(1.0, float(np.abs(R).max()))] = 0.0
    _, inv = np.unique(group, return_inverse=True)
    active = int((np.bincount(inv, weights=(A != 0)) > 0).sum())
    counts = [N, int((A != 0).sum()), active, int(inv.max()) + 1 if N else 0, float(R.sum())]
    return torch.as_tensor(A, dtype=torch.float32), counts


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _accumulate(engine, model, rollouts, weights, batches, n_tokens, bar) -> tuple[float, str | None]:
    """Backward every micro-batch's share −Σ w_i S_i / n_tokens; returns the summed loss and,
    when a micro-batch's loss is not finite, what went wrong (the rest is not backpropagated;
    the caller raises on every rank)."""
    total = 0.0
    for rows in batches:
        scores = engine.score(model, rollouts.select(rows))
        w = weights[rows].to(scores.token_logp.device)  # [n]
        # token_logp is 0 on uncounted positions, so the row sum is S_i
        part = -(w * scores.token_logp.sum(-1)).sum() / n_tokens
        if not torch.isfinite(part):
            cause = (
                "a counted token has log p = -inf under the engine's transform (a token outside its "
                "top-k/top-p set) or the model overflowed. Score with the transform the rows were "
                "sampled with (sft: no truncation)"
                if engine.config.transform.truncates
                else "the model's logits overflowed (no top-k/top-p is configured, so no token is "
                "excluded): its weights are broken or a previous step was too large; lower lr"
            )
            return total, f"non-finite loss on rows {rows[:8].tolist()}: {cause}."
        if part.requires_grad:  # else no trained parameter reaches the loss: grad_norm refuses
            part.backward()
        total += float(part.detach())
        bar.update(1)
    return total, None
