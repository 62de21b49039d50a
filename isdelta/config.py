"""cfg.yaml as frozen pydantic models: unknown keys rejected, errors that name the key path.

A run is fully described by one YAML file plus ``--set a.b=value`` overrides; the resolved
config is saved beside the outputs and its hash guards them (a changed config never mixes with
an old run's samples).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# numpy-only modules (isdelta.probes loads its torch modules lazily)
from isdelta.probes.token_classify import TokenThresholds
from isdelta.probes.token_positions import (
    DEFAULT_PATTERNS,
    DEFAULT_SELF_CORRECTION,
    compile_patterns,
    parse_positions,
)

__all__ = ["RunConfig", "ConfigError", "load_config", "load_yaml_config", "apply_overrides",
           "format_errors", "config_hash"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    path: str = Field(description="builtin name, .gguf file, local HF folder, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False  # run code shipped with a checkpoint: only when said in so many words
    allow_download: bool = False  # a hub id may be fetched from the network


class UpdateConfig(_Section):
    loss: Literal["sft", "reinforce"] = "reinforce"
    reward: Literal["boxed_match", "answer_match"] = "answer_match"  # reinforce only
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(1e-4, gt=0)
    steps: int = Field(1, ge=1)


class DataConfig(_Section):
    path: str = Field(description="jsonl file, or builtin:math for the prompts shipped in isdelta/data")
    prompt_field: str = "prompt"  # a string prompt ...
    messages_field: str = "messages"  # ... or a chat message list (used first when present)
    answer_field: str = "answer"
    response_field: str = "response"  # reference responses, for update.loss = sft
    chat_template: bool = True  # wrap string prompts as one user message
    limit: int | None = Field(None, ge=1)


class SamplingConfig(_Section):
    num_samples: int = Field(8, ge=2, description="G: samples per prompt (SNIS needs >= 2)")
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop_strings: tuple[str, ...] = ()
    prompts_per_batch: int = Field(8, ge=1)


class EngineSection(_Section):
    # false: the stop token's position leaves S, L and the entropy sums (estimator include="no_eos");
    # the importance weights still use the full-sequence ratio, since p0 sampled the stop too
    include_eos: bool = True
    token_budget: int = Field(16384, ge=1)


class EstimatorConfig(_Section):
    weights: Literal["psis", "none", "truncate", "clip"] = "psis"
    prompts: Literal["fixed", "sampled"] = "fixed"
    level: float = Field(0.95, gt=0, lt=1)
    clip: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _clip_needs_value(self) -> EstimatorConfig:
        if self.weights == "clip" and self.clip is None:
            raise ValueError("weights: clip needs estimator.clip (the largest allowed ratio, e.g. 10)")
        return self


class ProbeConfig(_Section):
    gradient: bool = True  # parameter-space ΔH₁ = <∇H(θ0), θ1 − θ0> (one backward pass)
    sweep: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # α: p_α = θ0 + α(θ1 − θ0), same samples
    per_token: bool = True  # also the entropy-rate gradient (a second backward per micro-batch)

    @model_validator(mode="after")
    def _finite_sweep(self) -> ProbeConfig:
        import math

        if not self.sweep or not all(math.isfinite(a) for a in self.sweep):
            raise ValueError("probe.sweep must be a non-empty list of finite step sizes, e.g. [0.5, 1, 2]")
        return self


class TokensConfig(_Section):
    """Token-level diagnostics (isdelta.probes.compare_tokens): where the distribution moved."""

    mode: Literal["generations", "teacher_forced", "both"] = "generations"  # carriers: each model's own
    # samples (same transform and seeds), the data's reference responses, or both
    positions: str = "all"  # all | every:K | random:N | pattern
    top_k: int = Field(5, ge=1)  # top tokens listed per position and model
    top_p: float = Field(0.9, gt=0, le=1)  # nucleus size = tokens needed to reach this mass
    tail_k: int = Field(20, ge=1)  # tail = mass beyond the top tail_k tokens
    patterns: tuple[str, ...] = DEFAULT_PATTERNS  # positions=pattern: regexes on the decoded completion
    window: int = Field(2, ge=0)  # ... ± this many tokens around each match
    n_random: int = Field(16, ge=0)  # ... plus this many random positions
    self_correction: tuple[str, ...] = DEFAULT_SELF_CORRECTION  # a lock after one of these
    self_correction_tokens: int = Field(6, ge=1)  # ... within this many preceding tokens
    context_tokens: int = Field(24, ge=1)  # context shown per position
    thresholds: TokenThresholds = TokenThresholds()  # lock / fork / diffuse (see token_classify)
    n_interesting: int = Field(10, ge=0)  # most changed positions listed in summary.md

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: str) -> str:
        parse_positions(v)
        return v

    @field_validator("patterns", "self_correction")
    @classmethod
    def _regexes(cls, v: tuple[str, ...], info) -> tuple[str, ...]:
        compile_patterns(v, info.field_name)
        return v


class OutputConfig(_Section):
    dir: str = "runs/demo"
    plots: bool = True
    n_trace_samples: int = Field(4, ge=0)  # completions shown in the per-token entropy plot


class RunConfig(_Section):
    seed: int = 0
    model: ModelConfig
    updated: ModelConfig | None = None
    update: UpdateConfig | None = None
    data: DataConfig
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineSection = EngineSection()
    estimator: EstimatorConfig = EstimatorConfig()
    output: OutputConfig = OutputConfig()
    probe: ProbeConfig | None = None  # ΔH₁ vs the true ΔH along the update direction
    tokens: TokensConfig | None = None  # per-position diagnostics of p0 vs p1

    @model_validator(mode="after")
    def _one_way_to_p1(self) -> RunConfig:
        if (self.updated is None) == (self.update is None):
            raise ValueError("give exactly one of `updated` (a second checkpoint: {path: ...}) or "
                             "`update` (an in-process step: {loss: reinforce, lr: ...})")
        return self


class ConfigError(ValueError):
    """A config file or override that does not validate; the message lists every problem."""


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (a pydantic error location) inside `model`."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            break
        model = sub[0]
    return sorted(model.model_fields)


def format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """One line per problem, each naming its key path (list items by index: ``models.1.path``)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(root, tuple(p for p in loc[:-1] if not isinstance(p, int)))
            lines.append(f"{path}: unknown key. Valid keys here: {', '.join(valid)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{path}: {msg}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; a numeric part indexes a list (``models.1.temperature``)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: {k!r} is not an index of a list of {len(node)}")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {keys[depth - 1]} is a value, not a section")
        if last:
            node[k] = value
        else:
            if isinstance(node, dict):
                node.setdefault(k, {})
            node = node[k]


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML: ``1e-4``, ``true``, ``[a, b]``)."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set update.lr=1e-4")
        _set_path(raw, key.strip(), yaml.safe_load(value))
    return raw


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError naming each bad key path."""
    return load_yaml_config(RunConfig, source, overrides)


def load_yaml_config(root: type[BaseModel], source: str | Path | dict,
                     overrides: list[str] | tuple[str, ...] = ()):
    """Read a YAML file (or take a dict), apply ``--set`` overrides, validate it as `root`."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, overrides)
    try:
        return root.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, root)) from None


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes the results (the output section excluded; an absent
    ``tokens`` section too, so adding the section to the schema kept older runs' hashes)."""
    exclude = {"output"} | ({"tokens"} if getattr(cfg, "tokens", 1) is None else set())
    data = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
