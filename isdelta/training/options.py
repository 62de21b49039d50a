"""The options of :class:`~isdelta.training.EntropyMonitor`, declared and checked once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral
from typing import Literal

import torch

from isdelta.engine.logprob import EngineConfig
from isdelta.estimators.inputs import check_options

__all__ = ["MonitorConfig", "token_ids"]


@dataclass(frozen=True)
class MonitorConfig:
    """Options of :class:`EntropyMonitor`, declared once (``EntropyMonitor(model, **options)``).

    Attributes
    ----------
    engine : EngineConfig
        How rows are scored (``EntropyMonitor(engine_config=...)``): the sampling transform
        (temperature, top-k, top-p: must be the sampler's) and ``token_budget``; ``include_eos``
        must stay True (whole sequences). Default: temperature 1, no truncation, no progress bar.
        ``requires_grad`` is forced off.
    weights : {"psis", "none", "truncate", "clip"}
        Importance-weight scheme (``clip`` also needs ``clip=c``).
    clip : float, optional
        The cap for ``weights="clip"``.
    level : float
        Coverage of the confidence intervals.
    prompts : {"fixed", "sampled"}
        Standard-error mode of :func:`isdelta.estimators.estimate`.
    every : int
        Measure every k-th step (steps are counted by ``after``/``skip`` calls); other steps
        cost nothing and give ``None``.
    strict : bool
        Raise on any failure (for debugging) instead of returning an invalid result, and where the
        input checks would correct a mask (:mod:`isdelta.training.inputs`).
    rao_blackwell : {"auto", "always", "never"}
        Whether to run the p0 forward for entropy sums when ``old_logp`` is given (module doc).
    group_by : {"prompt", "given"}
        "prompt": rows with the same real prompt tokens form one group, keyed by a hash of the
        tokens (global across micro-batches and ranks). "given": the batch's ``group`` (or
        ``num_generations``) as is; the caller keeps ids unique across micro-batches and ranks
        (needed when equal prompt tokens are different prompts, e.g. different images).
    distributed : {"auto", "local"}
        "auto": gather rows over ``torch.distributed`` ranks when initialised; "local": estimate
        on this rank's rows only.
    per_decision : {"cv", "pd", "pd_sn", "off"}
        The first per-decision estimator (:func:`isdelta.estimators.estimate_tokens`) the
        headline policy tries when p0's per-position entropies are scored (a p0 forward ran);
        then "pd", "pd_sn" and sequence-level SNIS, the first whose checks hold
        (:func:`isdelta.estimators.headline`). "off", or no p0 forward: SNIS only. SNIS is
        reported beside the headline either way (``result.delta_snis``).
    eos_token_ids : int or sequence of int, optional
        Stop ids for dict batches; default the model's ``generation_config.eos_token_id``.
    pad_token_id : int, optional
        The pad id, read only to tell pads from sampled tokens when the input checks infer real
        completion lengths (a mask is never built from it); default the model's
        ``config.pad_token_id`` (or ``generation_config``'s). Pass the tokenizer's when the model
        config has none.
    """

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(progress=False))
    weights: Literal["psis", "none", "truncate", "clip"] = "psis"
    clip: float | None = None
    level: float = 0.95
    prompts: Literal["fixed", "sampled"] = "fixed"
    every: int = 1
    strict: bool = False
    rao_blackwell: Literal["auto", "always", "never"] = "auto"
    group_by: Literal["prompt", "given"] = "prompt"
    distributed: Literal["auto", "local"] = "auto"
    per_decision: Literal["cv", "pd", "pd_sn", "off"] = "cv"
    eos_token_ids: int | Sequence[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise TypeError(
                f"engine_config: expected an isdelta EngineConfig; got "
                f"{type(self.engine).__name__}. Build one with EngineConfig(temperature=…)."
            )
        if not self.engine.include_eos:
            # Scoring without the stop token would weight rows by a partial ratio, but p0 sampled
            # the stop token too: the importance weights need the full-sequence ratio.
            raise ValueError(
                "engine_config.include_eos=False: the monitor scores whole sequences (the importance "
                "weights need the full-sequence ratio, stop token included). Pass include_eos=True; "
                "for entropies without the stop token use isdelta.estimate(include='no_eos', ...) "
                "with the engine's stop_logp / stop_entropy_sum."
            )
        object.__setattr__(self, "engine", replace(self.engine, requires_grad=False))
        check_options(weights=self.weights, prompts=self.prompts, level=self.level, clip=self.clip)
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict: expected True or False; got {self.strict!r}.")
        if self.eos_token_ids is not None:
            token_ids(self.eos_token_ids, "eos_token_ids")
        if self.pad_token_id is not None:
            token_ids(self.pad_token_id, "pad_token_id", several=False)
        if isinstance(self.every, bool) or int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every: expected a positive integer (measure every k-th step); got {self.every!r}.")
        for name, value, valid in (
            ("rao_blackwell", self.rao_blackwell, ("auto", "always", "never")),
            ("group_by", self.group_by, ("prompt", "given")),
            ("distributed", self.distributed, ("auto", "local")),
            ("per_decision", self.per_decision, ("cv", "pd", "pd_sn", "off")),
        ):
            if value not in valid:
                raise ValueError(f"{name}: expected one of {list(valid)}; got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def token_ids(value, name: str, several: bool = True) -> tuple[int, ...]:
    """Token ids given as an int (or, with ``several``, a non-empty sequence or tensor of ints), checked
    and sorted; a ``TypeError``/``ValueError`` that names ``name`` otherwise."""
    if isinstance(value, Integral):
        items = [value]
    elif several and isinstance(value, torch.Tensor):
        items = value.flatten().tolist()
    elif several and isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
    else:
        items = []
    if not items or not all(isinstance(i, Integral) and not isinstance(i, bool) for i in items):
        what = "an int or a non-empty sequence of ints" if several else "an int"
        raise TypeError(f"{name}: expected {what} (token ids); got {value!r}. Pass the tokenizer's id(s).")
    if any(i < 0 for i in items):
        raise ValueError(f"{name}: token ids are non-negative; got {value!r}. Pass the tokenizer's id(s).")
    return tuple(sorted({int(i) for i in items}))
