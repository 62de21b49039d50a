"""The run's cfg.yaml schema (frozen pydantic sections, see :mod:`isdelta.program`).

A run is fully described by one YAML file plus ``--set a.b=value`` overrides; the resolved
config is saved beside the outputs and its hash, with the data's content hash, stamps them (a
changed config or data file never mixes with an old run's samples).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from isdelta.engine.transform import LogitTransform
from isdelta.program import ModelConfig, Section, load_yaml_config, options_section
from isdelta.program.config import checked_by
from isdelta.tokens.options import TokenOptions

__all__ = ["RunConfig", "config_hash", "load_config"]

# ranges the library declares, checked by it (the messages give each range's reason)
_STEP = checked_by("isdelta.training.update:check_step_options")  # lr, steps
_SAMPLE = checked_by("isdelta.engine.sampling:check_sample_options")  # num_samples, seed
_TRANSFORM = checked_by(LogitTransform)  # temperature, top_k, top_p


class UpdateConfig(Section):
    loss: Literal["sft", "reinforce"] = "reinforce"
    reward: Literal["boxed_match", "answer_match"] = "answer_match"  # reinforce only
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, _STEP] = 1e-4
    steps: Annotated[int, _STEP] = 1


class DataConfig(Section):
    path: str = Field(description="jsonl file, or builtin:math for the prompts shipped in isdelta/data")
    prompt_field: str = "prompt"  # a string prompt ...
    messages_field: str = "messages"  # ... or a chat message list (used first when present)
    answer_field: str = "answer"
    response_field: str = "response"  # reference responses, for update.loss = sft
    chat_template: bool = True  # wrap string prompts as one user message
    limit: int | None = Field(None, ge=1)


class SamplingConfig(Section):
    num_samples: Annotated[int, _SAMPLE] = Field(8, ge=2, description="G: samples per prompt (SNIS needs >= 2)")
    max_new_tokens: int = Field(96, ge=1)  # checked against each prompt and the model's context before sampling
    temperature: Annotated[float, _TRANSFORM] = 1.0
    top_k: Annotated[int | None, _TRANSFORM] = None  # 0 or null: off
    top_p: Annotated[float, _TRANSFORM] = 1.0
    stop_strings: tuple[Annotated[str, Field(min_length=1)], ...] = ()  # an empty one would stop at once
    prompts_per_batch: int = Field(8, ge=1)
    # hf: HF generate on p0 itself; vllm: vLLM (a proposal q ≠ p0: both entropies importance-weighted,
    # the report shows the sampler–scorer gap); vllm needs the vllm package (make vllm-setup)
    backend: Literal["hf", "vllm"] = "hf"

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        if v == "vllm":  # imported only then: the engine package pulls in torch
            from isdelta.engine.vllm_sampling import INSTALL_HINT, vllm_available

            if not vllm_available():
                raise ValueError(f"vllm is not installed in this Python environment; {INSTALL_HINT}")
        return v

    @model_validator(mode="after")
    def _vllm_takes_it(self) -> SamplingConfig:
        """vLLM refuses some values the HF back end takes (a temperature above 2): say so before it starts."""
        if self.backend == "vllm":
            from isdelta.engine.vllm_sampling import check_vllm_options

            try:
                check_vllm_options(transform=self.transform(), num_samples=self.num_samples)
            except ValueError as e:
                raise ValueError(f"sampling.{e}") from None
        return self

    def transform(self) -> LogitTransform:
        """The sampling transform of these keys (the library's type, checked there)."""
        return LogitTransform(self.temperature, self.top_k, self.top_p)


class EngineSection(Section):
    # false: the stop token's position leaves S, L and the entropy sums (estimator include="no_eos");
    # the importance weights still use the full-sequence ratio, since p0 sampled the stop too
    include_eos: bool = True
    token_budget: int = Field(16384, ge=1)
    # the chunk statistics in one compiled pass over the vocabulary (EngineConfig.fused): "auto"
    # compiles where a score call repays the compile (2**30 logits on CPU), "on" always, "off" never
    fused: Literal["auto", "on", "off"] = "auto"

    @field_validator("fused", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):  # YAML 1.1 reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EstimatorConfig(Section):
    weights: Literal["psis", "none", "truncate", "clip"] = "psis"
    prompts: Literal["fixed", "sampled"] = "fixed"
    level: float = Field(0.95, gt=0, lt=1)
    clip: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _clip_needs_value(self) -> EstimatorConfig:
        if self.weights == "clip" and self.clip is None:
            raise ValueError("weights: clip needs estimator.clip (the largest allowed ratio, e.g. 10)")
        return self


MAX_SWEEP = 1000.0  # the largest |α| of probe.sweep: α scales the update, α = 1 is the step itself


class ProbeConfig(Section):
    gradient: bool = True  # parameter-space ΔH₁ = <∇H(θ0), θ1 − θ0> (one backward pass)
    sweep: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # α: p_α = θ0 + α(θ1 − θ0), same samples
    per_token: bool = True  # also the entropy-rate gradient (a second backward per micro-batch)

    @model_validator(mode="after")
    def _finite_sweep(self) -> ProbeConfig:
        if not self.sweep or not all(math.isfinite(a) for a in self.sweep):
            raise ValueError("probe.sweep must be a non-empty list of finite step sizes, e.g. [0.5, 1, 2]")
        far = [a for a in self.sweep if abs(a) > MAX_SWEEP]
        if far:
            raise ValueError(
                f"probe.sweep: {far[0]:g} is past ±{MAX_SWEEP:g}. α scales the update (α = 1 is the step taken; the "
                "default brackets it, 0.25 … 4): θ0 + α(θ1 − θ0) that far out is no update the first-order ΔH₁ "
                "describes, p0's samples cannot weigh it, and its weights overflow float32 (α = 1e30). Use step "
                f"sizes within ±{MAX_SWEEP:g}"
            )
        return self


# Token-level diagnostics (isdelta.tokens.compare_tokens): where the distribution moved. The keys
# are TokenOptions' own (declared there); the transform, include_eos, seed and token_budget come
# from the other sections.
TokensConfig = options_section(
    "TokensConfig",
    TokenOptions,
    derived=("transform", "include_eos", "seed", "token_budget", "chunk_elems", "progress"),
    # carriers: each model's own samples (same transform and seeds), the data's reference
    # responses teacher-forced, or both
    mode=(Literal["generations", "teacher_forced", "both"], "generations"),
    n_interesting=(int, Field(10, ge=0)),  # most changed positions listed in summary.md
)


class OutputConfig(Section):
    dir: str = "runs/demo"
    plots: bool = True
    n_trace_samples: int = Field(4, ge=0)  # completions shown in the per-token entropy plot


class RunConfig(Section):
    seed: Annotated[int, _SAMPLE] = 0
    model: ModelConfig
    updated: ModelConfig | None = None
    update: UpdateConfig | None = None
    data: DataConfig
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineSection = EngineSection()
    estimator: EstimatorConfig = EstimatorConfig()
    output: OutputConfig = OutputConfig()
    probe: ProbeConfig | None = None  # ΔH₁ vs the true ΔH along the update direction
    tokens: TokensConfig | None = None  # per-position diagnostics of p0 vs p1 (TokenOptions' keys)
    # a trajectory: ΔH from `model` to each checkpoint in training order (isdelta.run.trajectory),
    # loaded like `model` (its dtype, device, trust_remote_code, allow_download)
    checkpoints: tuple[Annotated[str, Field(min_length=1)], ...] | None = None

    @model_validator(mode="after")
    def _one_way_to_p1(self) -> RunConfig:
        ways = [k for k in ("updated", "update", "checkpoints") if getattr(self, k) is not None]
        if len(ways) != 1:
            raise ValueError(
                "give exactly one of `updated` (a second checkpoint: {path: ...}), `update` (an in-process "
                "step: {loss: reinforce, lr: ...}) or `checkpoints` (a trajectory: [path, ...])"
                + (f"; got {' and '.join(ways)}" if ways else "")
            )
        if self.checkpoints is not None:
            _check_checkpoints(self)
        if self.sampling.backend != "hf":
            _check_proposal_stages(self)
        if self.update is not None:
            from isdelta.training.update import check_lr_fits

            try:
                check_lr_fits(self.update.lr, self.model.dtype)
            except FloatingPointError as e:
                raise ValueError(f"update.lr: {e} (model.dtype: {self.model.dtype})") from None
        return self


def _check_proposal_stages(cfg: RunConfig) -> None:
    """The stages that read p0's samples as drawn from p0 itself refuse a vLLM sampler (q ≠ p0)."""
    for key in ("probe", "tokens", "checkpoints"):
        if getattr(cfg, key) is not None:
            raise ValueError(
                f"sampling.backend: {cfg.sampling.backend} samples from a proposal q ≠ p0, which only the "
                f"ΔH estimate weights for; `{key}` reads the samples as p0's. Drop `{key}`, or use backend: hf"
            )


def _check_checkpoints(cfg: RunConfig) -> None:
    """A trajectory's list: not empty, no path twice, and no two-model stage beside it."""
    if not cfg.checkpoints:
        raise ValueError("checkpoints: the list is empty; give the checkpoints' paths in training order")
    seen: dict[str, int] = {}
    for i, path in enumerate(cfg.checkpoints):
        if path in seen:
            raise ValueError(f"checkpoints.{i}: {path!r} repeats checkpoints.{seen[path]}; list each checkpoint once")
        seen[path] = i
    for key in ("probe", "tokens"):
        if getattr(cfg, key) is not None:
            raise ValueError(
                f"`{key}` compares two models and does not run on a trajectory; drop it, or run it on one "
                "pair (updated: {path: CHECKPOINT} instead of checkpoints)"
            )


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError naming each bad key path."""
    return load_yaml_config(RunConfig, source, overrides)


# keys added to the schema after runs existed, with the value that leaves them out of the hash
# (what every older run had), so those runs' folders still resume: (section or None, key, value)
ADDED_LATER = (
    (None, "tokens", None),
    (None, "checkpoints", None),
    ("engine", "fused", "auto"),
    ("sampling", "backend", "hf"),
)


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes the results: the output section excluded, and each key of
    ``ADDED_LATER`` while it holds the value older runs had."""
    data = cfg.model_dump(mode="json", exclude={"output"})
    for section, key, value in ADDED_LATER:
        where = data if section is None else data.get(section, {})
        if key in where and where[key] == value:
            del where[key]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
