r"""EntropyGuard: predict the ΔH of the step about to be taken, and scale it to hold ΔH in a band.

In a loop that already runs the monitor, the guard replaces ``optimizer.step()``::

    snap = monitor.before(fresh)                      # p0 on fresh rows of the batch's prompts
    loss.backward()                                   # (and any gradient clipping)
    decision = guard.step(snap)                       # predict, scale the lr, optimizer.step()
    result = monitor.after(snap)                      # the measured ΔH, with its verdict
    guard.observe(result)                             # the measurement corrects later predictions
    logger.log({**result.scalars(), **guard.scalars()})

**The prediction.** The direction of the step is the optimizer's own: ``optimizer.step()`` is run
once on the gradients the trainer left in ``.grad`` and undone bit for bit (parameters and
optimizer state), so d = θ1 − θ0 is AdamW's preconditioned update (or SGD's, or any other),
not the raw gradient. ΔH₁ = ⟨∇θ H(θ0), d⟩ comes from the score-function probe on the snapshots'
rows (:func:`isdelta.probes.gradient_delta`: one extra backward, two per token), with its
between-prompt SE. Those rows should be samples of p0 the step did not train on
(:func:`isdelta.training.fresh_rows`; TRL: ``attach(trainer, fresh=k)``): on the trained rows d
holds each row's own gradient, and ΔH₁ read there carried that self-influence, 4–14× the ΔH₁ of
fresh rows on SmolLM2 GRPO steps of 48 rows (:mod:`isdelta.training.fresh`). For SGD (with or
without momentum), Adam and AdamW the step is proportional to the learning rate, so the step at
lr × s moves by s·d and its first-order ΔH is s·ΔH₁.

**The correction.** First order is not the truth: the measured ΔH of the last ``memory`` steps
whose level the headline policy declared valid gives a factor c, the least-squares slope through
the origin of measured on first-order ΔH (clipped to ``correction_bounds``; 1 until two such steps
exist). A measurement the policy did not declare valid never moves c; the guard says so in its
record and keeps the previous factor.

**The trend.** The same valid measurements divided by their steps' scales are a second
prediction of the next full step (steps of one run resemble each other); where two or more exist,
c·ΔH₁ and their mean are combined by precision (ΔH₁'s between-prompt SE; the trend's spread over
steps), which keeps a noisy ΔH₁ from letting a step through that the recent steps say is large.

**The action.** The prediction of the full step ± z SE inside ``band`` (low ≤ 0 ≤ high): the step
is taken as the trainer set it (scale 1). Outside: the lr of every parameter group is multiplied
by the largest s that brings that range inside the band, for this step only (clipped to
[``min_scale``, 1]; the guard never enlarges a step), and restored after it. A step the guard
cannot predict (too few rows per prompt, no gradient, an error) is taken unscaled, with the
reason; nothing raises into the loop unless ``strict=True``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch

from isdelta.engine.logprob import EngineConfig
from isdelta.engine.rollouts import Rollouts
from isdelta.probes.gradient import gradient_delta
from isdelta.training.inputs import snapshot_list
from isdelta.training.rows import multi_row_groups
from isdelta.training.verdict import MonitorResult

__all__ = ["EntropyGuard", "GuardDecision", "step_direction"]


def step_direction(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """d = θ1 − θ0 of ``optimizer.step()`` on the current ``.grad``, the step undone exactly.

    The parameters and the optimizer's per-parameter state (AdamW's moments and step count) are
    restored to the bit; entries the step created (a first step's state) are removed. Only
    parameters the step moved are returned (name → tensor, on the parameter's device).
    """
    names = {p: n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"] if p in names]
    before = {p: p.detach().clone() for p in params}
    state = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state}  # fmt: skip
    try:
        with torch.no_grad():
            optimizer.step()
        d = {names[p]: p.detach() - before[p] for p in params}
    finally:
        with torch.no_grad():
            for p in params:
                p.copy_(before[p])
        for p in params:
            if p not in state:
                optimizer.state.pop(p, None)
                continue
            now = optimizer.state[p]
            for k in [k for k in now if k not in state[p]]:
                del now[k]
            for k, v in state[p].items():
                if torch.is_tensor(v) and torch.is_tensor(now.get(k)) and now[k].shape == v.shape:
                    now[k].copy_(v)
                else:
                    now[k] = v
    return {n: t for n, t in d.items() if bool(torch.any(t != 0))}


@dataclass(frozen=True)
class GuardDecision:
    """What the guard did on one step, and later what the step measured.

    ``delta1`` / ``delta1_se``: first-order ΔH of the full (unscaled) step at the guard's level;
    ``correction``: the factor c in force; ``trend``: the measured ΔH per unit scale of the recent
    valid steps (None before two); ``predicted`` ± ``predicted_se``: the guard's prediction for
    the step it let through (c·ΔH₁ and the trend weighted by precision, times the scale);
    ``scale``: the lr multiplier used (1: not acted); ``reason``: why it acted or not. After
    :meth:`EntropyGuard.observe`: ``measured`` (None unless the level was valid), ``used`` (the
    measurement entered the correction), ``note``.
    """

    step: int
    scale: float
    acted: bool
    reason: str
    delta1: float | None = None
    delta1_se: float | None = None
    correction: float = 1.0
    predicted: float | None = None
    predicted_se: float | None = None
    trend: float | None = None
    measured: float | None = None
    measured_se: float | None = None
    used: bool = False
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class EntropyGuard:
    """Hold each optimizer step's ΔH (per token or per sequence, nats) inside ``band``.

    Parameters
    ----------
    model : the trained module (its parameters are the optimizer's)
    optimizer : torch optimizer whose step is proportional to its ``lr`` (SGD, Adam, AdamW)
    band : (low, high) with low ≤ 0 ≤ high; either may be ±inf (e.g. ``(-0.02, inf)``: never let
        one step lower the entropy rate by more than 0.02 nats per token)
    level : "token" (entropy rate, the default) or "sequence"
    z : the prediction's range is ΔH₁ ± z SE (between prompts); the guard keeps the whole range in
        the band (0: the point prediction only; larger: more caution where ΔH₁ is noisy)
    min_scale : the smallest lr multiplier the guard applies (0 < min_scale ≤ 1)
    memory : the valid measured steps the correction uses (the most recent ones)
    correction_bounds : the range of the factor c
    engine_config : the transform and micro-batching of the probe (use the monitor's)
    strict : raise instead of taking an unpredicted step unscaled
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        band: tuple[float, float],
        *,
        level: Literal["token", "sequence"] = "token",
        z: float = 1.0,
        min_scale: float = 0.05,
        memory: int = 8,
        correction_bounds: tuple[float, float] = (0.2, 5.0),
        engine_config: EngineConfig | None = None,
        strict: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}.")
        low, high = (float(x) for x in band)
        if math.isnan(low) or math.isnan(high) or not low <= 0.0 <= high or low == high:
            raise ValueError(
                f"band must be (low, high) with low ≤ 0 ≤ high; got {band!r}. The guard can only shrink a "
                "step toward ΔH = 0, so the band has to contain 0 (use ±inf for a one-sided band)."
            )
        if level not in ("token", "sequence"):
            raise ValueError(f'level must be "token" or "sequence"; got {level!r}.')
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"z must be a finite number ≥ 0 (SEs of ΔH₁ in the prediction's range); got {z!r}.")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1]; got {min_scale!r}.")
        lo_c, hi_c = correction_bounds
        if not 0.0 < lo_c <= 1.0 <= hi_c:
            raise ValueError(
                f"correction_bounds must be (low, high) with 0 < low ≤ 1 ≤ high; got {correction_bounds!r}."
            )
        if int(memory) < 2:
            raise ValueError(f"memory must be ≥ 2 (the correction is a slope); got {memory!r}.")
        self.model, self.optimizer, self.z = model, optimizer, float(z)
        self.band, self.level, self.min_scale, self.memory = (low, high), level, float(min_scale), int(memory)
        self.correction_bounds, self.strict = (float(lo_c), float(hi_c)), bool(strict)
        self.engine_config = replace(engine_config or EngineConfig(), progress=False)
        self.history: list[GuardDecision] = []
        self._kept_lr: list | None = None
        # a wrapper (accelerate's AcceleratedOptimizer) shares its param_groups with the optimizer
        # it wraps; the dry run steps the inner one, with none of the wrapper's bookkeeping
        inner = getattr(optimizer, "optimizer", None)
        self._inner = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ the correction
    @property
    def correction(self) -> float:
        """c: slope of measured ΔH on first-order ΔH (scale·ΔH₁, uncorrected) over the last
        ``memory`` steps used (1 with fewer than 2)."""
        pts = [(d.scale * d.delta1, d.measured) for d in self.history if d.used][-self.memory :]
        if len(pts) < 2:
            return 1.0
        x, y = np.array(pts, dtype=np.float64).T
        denom = float(x @ x)
        c = float(x @ y) / denom if denom > 0 else 1.0
        return float(np.clip(c, *self.correction_bounds)) if math.isfinite(c) else 1.0

    @property
    def trend(self) -> tuple[float, float] | None:
        """(mean, predictive SD) of measured ΔH per unit scale (measured / scale) over the last
        ``memory`` steps used: what the next full step would do if it did what they did; None
        with fewer than 2 (the SD is their spread × √(1 + 1/n), the spread of one more step)."""
        x = np.array([d.measured / d.scale for d in self.history if d.used][-self.memory :], dtype=np.float64)
        if len(x) < 2:
            return None
        return float(x.mean()), float(x.std(ddof=1) * math.sqrt(1.0 + 1.0 / len(x)))

    # ------------------------------------------------------------------ one step
    def predict(self, snapshots) -> tuple[float, float]:
        """(ΔH₁, SE) of the step ``optimizer.step()`` would take now, at the guard's level."""
        rollouts = _rows(snapshots)
        d = step_direction(self.model, self._inner)
        if not d:
            raise ValueError("the optimizer's step moves no parameter (no gradient in .grad?)")
        g = gradient_delta(self.model, rollouts, d, per_token=self.level == "token", engine_config=self.engine_config)
        e = g.delta1_tok if self.level == "token" else g.delta1
        return float(e.value), float(e.se)

    def step(self, snapshots) -> GuardDecision:
        """Predict ΔH of this step, scale the lr if the prediction leaves the band, take the step
        (``optimizer.step()``) and restore the lr. Call after backward (and clipping)."""
        decision = self.prepare(snapshots)
        try:
            self.optimizer.step()
        finally:
            self.finish()
        return decision

    def prepare(self, snapshots) -> GuardDecision:
        """The first half of :meth:`step`, for trainers that call ``optimizer.step()`` themselves:
        predict, and multiply every group's lr by the scale; :meth:`finish` restores it."""
        self.finish()
        c, n = self.correction, len(self.history)
        try:
            d1, se = self.predict(snapshots)
            if not (math.isfinite(d1) and math.isfinite(se)):
                raise FloatingPointError(f"ΔH₁ = {d1} ± {se} is not finite")
        except Exception as exc:
            if self.strict:
                raise
            reason = f"no prediction ({type(exc).__name__}: {exc}); the step is taken unscaled"
            self._warn_once(type(exc).__name__, reason)
            decision = GuardDecision(n, 1.0, False, reason, correction=c)
        else:
            full, full_se, trend = c * d1, c * se, self.trend
            if trend is not None:  # two predictions of the full step's ΔH, weighted by precision
                w1, w2 = 1.0 / max(full_se, 1e-300) ** 2, 1.0 / max(trend[1], 1e-300) ** 2
                full, full_se = (w1 * full + w2 * trend[0]) / (w1 + w2), (w1 + w2) ** -0.5
            scale, reason = self._scale(full - self.z * full_se, full + self.z * full_se)
            decision = GuardDecision(n, scale, scale < 1.0, reason, delta1=d1, delta1_se=se, correction=c,
                                     predicted=scale * full, predicted_se=scale * full_se,
                                     trend=None if trend is None else trend[0])  # fmt: skip
        groups = self.optimizer.param_groups
        self._kept_lr = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * decision.scale
        self.history.append(decision)
        return decision

    def finish(self) -> None:
        """Restore the lr :meth:`prepare` scaled (after ``optimizer.step()``; idempotent)."""
        if self._kept_lr is not None:
            for g, lr in zip(self.optimizer.param_groups, self._kept_lr):
                g["lr"] = lr
            self._kept_lr = None

    def _scale(self, lo: float, hi: float) -> tuple[float, str]:
        """The largest s ≤ 1 that brings [lo, hi] (the corrected prediction ± z SE, at full step)
        inside the band: s·lo ≥ low and s·hi ≤ high (first order: the range scales with s)."""
        low, high = self.band
        said = f"predicted [{lo:+.4g}, {hi:+.4g}] at full step (± {self.z:g} SE)"
        if low <= lo and hi <= high:
            return 1.0, f"{said}, inside the band [{low:g}, {high:g}]"
        scale = min(low / lo if lo < low else 1.0, high / hi if hi > high else 1.0)
        scale = float(np.clip(scale, self.min_scale, 1.0))
        return scale, f"{said}, outside [{low:g}, {high:g}]: lr × {scale:.3g}"

    def observe(self, result: MonitorResult | None) -> GuardDecision | None:
        """Record the measured ΔH of the last step; only a level the policy declared valid
        enters the correction. Returns the updated decision (None before any step)."""
        if not self.history:
            return None
        last = self.history[-1]
        ok = result is not None and (result.valid_tok if self.level == "token" else result.valid)
        est = (result.delta_tok if self.level == "token" else result.delta) if ok else None
        if est is None or not math.isfinite(est.value):
            why = "no measurement" if result is None else (result.reason or "the level is not valid")
            note = f"not valid ({why}): the correction is unchanged"
            last = replace(last, note=note)
        elif last.predicted is None:
            last = replace(last, measured=est.value, measured_se=est.se, note="measured; no prediction to correct")
        else:
            last = replace(
                last, measured=est.value, measured_se=est.se, used=True, note="measured; enters the correction"
            )
        self.history[-1] = last
        return last

    def scalars(self, prefix: str = "entropy/") -> dict[str, float]:
        """The last step's record for a logger: ``guard_scale``, ``guard_acted``, ``guard_delta1``,
        ``guard_delta1_se``, ``guard_correction``, ``guard_trend``, ``guard_predicted``,
        ``guard_predicted_se``, ``guard_measured`` (NaN
        where not valid) and ``guard_used`` (1: the measurement entered the correction)."""
        if not self.history:
            return {}
        d = self.history[-1]
        nan = float("nan")
        out = {
            "guard_scale": d.scale,
            "guard_acted": float(d.acted),
            "guard_delta1": nan if d.delta1 is None else d.delta1,
            "guard_delta1_se": nan if d.delta1_se is None else d.delta1_se,
            "guard_correction": d.correction,
            "guard_predicted": nan if d.predicted is None else d.predicted,
            "guard_predicted_se": nan if d.predicted_se is None else d.predicted_se,
            "guard_trend": nan if d.trend is None else d.trend,
            "guard_measured": nan if d.measured is None else d.measured,
            "guard_used": float(d.used),
        }
        return {prefix + k: v for k, v in out.items()}

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"EntropyGuard: {message}", stacklevel=3)


def _rows(snapshots) -> Rollouts:
    """The step's rows (a Rollouts, or the monitor's snapshots), prompts with one row left out."""
    if isinstance(snapshots, Rollouts):
        ro = snapshots
    else:
        parts = [s.rollouts for s in snapshot_list(snapshots) if s.rollouts is not None]
        if not parts:
            raise ValueError("the snapshots hold no rows (a step the monitor skipped)")
        ro = parts[0] if len(parts) == 1 else Rollouts.concat(parts)
    keep = np.flatnonzero(multi_row_groups(ro.group.cpu().numpy()))
    if len(keep) == 0:
        raise ValueError("no prompt has two rows: the probe's within-prompt covariance needs G ≥ 2")
    return ro if len(keep) == ro.n_rows else ro.select(torch.as_tensor(keep))
