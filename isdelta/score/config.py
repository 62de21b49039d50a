"""score.yaml as frozen pydantic models (the conventions of :mod:`isdelta.program`).

Unknown keys are rejected with the list of valid ones, every error names its key path
(``models.1.temperature``), and ``--set a.b=value`` overrides are type-checked the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from isdelta.program import ModelConfig, Section, load_yaml_config
from isdelta.score.stats import KEY_STATS

__all__ = ["ScoreConfig", "load_score_config", "parse_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ScoreModel(ModelConfig):
    # the run's model section plus a name (folder and column label) and the scoring temperature
    name: str | None = Field(None, description="default: the path's last part, plus -T<t> when t != 1")
    temperature: float = Field(1.0, gt=0)  # scores logits / T: the tempered distribution's entropy


class ScoreData(Section):
    path: str = Field(description="jsonl or txt file, or builtin:score_demo (isdelta/data)")
    format: Literal["auto", "jsonl", "txt"] = "auto"  # auto: by the file suffix
    text_field: str = "text"  # jsonl: the field holding the text
    id_field: str | None = "id"  # jsonl: a field naming the text (else its 0-based index)
    txt_unit: Literal["line", "paragraph"] = "line"  # txt: one text per line, or per blank-line block
    # none: the raw text after a one-token prefix; user / assistant: the text as the content of
    # a chat message (only the text's own tokens are scored, the template is context)
    wrap: Literal["none", "user", "assistant"] = "none"
    prompt_field: str = "prompt"  # wrap=assistant: the user turn, from this field ...
    user_message: str = ""  # ... or this when the row has none
    # wrap=none: the context token before the text (bos, eos, a named token, or none: the text's
    # first token is then the context and is not scored)
    prefix: Literal["bos", "eos", "token", "none"] = "bos"
    prefix_token: str | None = None  # prefix=token: e.g. "<|endoftext|>"
    max_tokens: int | None = Field(2048, ge=1)  # longer texts: the first max_tokens are scored
    limit: int | None = Field(None, ge=1)  # score the first `limit` texts only

    @model_validator(mode="after")
    def _prefix_token(self) -> ScoreData:
        if (self.prefix == "token") != (self.prefix_token is not None):
            raise ValueError(
                "prefix: token needs data.prefix_token (a token string such as "
                "'<|endoftext|>'), and prefix_token is only used with prefix: token"
            )
        return self


class ScoreEngine(Section):
    token_budget: int = Field(8192, ge=1)  # most tokens (rows × width) in one forward pass
    chunk_texts: int = Field(256, ge=1)  # texts read, scored and written at a time (memory bound)


class CurriculumConfig(Section):
    model: str | None = None  # whose statistics sort the corpus; default the first model
    # a statistic, or a linear combination {stat: weight}; a term "stat@name" reads another model
    key: str | dict[str, float] = "entropy_mean"
    standardize: bool = False  # z-score each term before combining (terms in different units)
    bins: int = Field(4, ge=1)
    binning: Literal["count", "width"] = "count"  # equal numbers of texts, or equal key ranges
    schedule: Literal["increasing", "decreasing"] | list[int] = "increasing"  # bin order


class CompareConfig(Section):
    stat: str = "entropy_mean"  # the per-text statistic compared across models
    distance: Literal["rmse", "mean_abs", "one_minus_spearman"] = "rmse"


class ScoreOutput(Section):
    dir: str = "runs/score"
    plots: bool = True


class ScoreConfig(Section):
    models: list[ScoreModel] = Field(min_length=1)
    data: ScoreData
    engine: ScoreEngine = ScoreEngine()
    curriculum: CurriculumConfig | None = CurriculumConfig()
    compare: CompareConfig | None = CompareConfig()  # used with two models or more
    output: ScoreOutput = ScoreOutput()

    @property
    def names(self) -> tuple[str, ...]:
        """Resolved model names, in config order."""
        return tuple(_model_name(m) for m in self.models)

    @model_validator(mode="after")
    def _cross_checks(self) -> ScoreConfig:
        names = self.names
        for n in names:
            if not _NAME.match(n):
                raise ValueError(
                    f"model name {n!r} is not a safe folder name: use letters, digits, "
                    "'.', '_' and '-' (set models.N.name)"
                )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names {dup} repeat: give each entry its own models.N.name")
        if self.curriculum is not None:
            _check_curriculum(self.curriculum, names)
        if self.compare is not None and self.compare.stat not in KEY_STATS:
            raise ValueError(f"compare.stat {self.compare.stat!r} is not a statistic; choose one of {list(KEY_STATS)}")
        return self


def _model_name(m: ScoreModel) -> str:
    if m.name:
        return m.name
    base = Path(m.path).stem if m.path.lower().endswith(".gguf") else Path(m.path.rstrip("/")).name
    return base + (f"-T{m.temperature:g}" if m.temperature != 1.0 else "")


def parse_key(key: str | dict[str, float], default_model: str) -> list[tuple[str, str, float]]:
    """The curriculum key as (statistic, model name, weight) terms."""
    terms = {key: 1.0} if isinstance(key, str) else key
    out = []
    for term, weight in terms.items():
        stat, _, model = term.partition("@")
        out.append((stat, model or default_model, float(weight)))
    return out


def _check_curriculum(c: CurriculumConfig, names: tuple[str, ...]) -> None:
    if c.model is not None and c.model not in names:
        raise ValueError(f"curriculum.model {c.model!r} is none of the models {list(names)}")
    if isinstance(c.key, dict) and not c.key:
        raise ValueError("curriculum.key is an empty mapping: give a statistic or {stat: weight}")
    for stat, model, _ in parse_key(c.key, c.model or names[0]):
        if stat not in KEY_STATS:
            raise ValueError(
                f"curriculum.key: {stat!r} is not a statistic; choose from {list(KEY_STATS)} "
                "(optionally as stat@model_name)"
            )
        if model not in names:
            raise ValueError(f"curriculum.key: model {model!r} (in {stat}@{model}) is none of {list(names)}")
    if isinstance(c.schedule, list) and sorted(c.schedule) != list(range(c.bins)):
        raise ValueError(
            f"curriculum.schedule {c.schedule} is not a permutation of the bin indices "
            f"0..{c.bins - 1}; give each bin once, e.g. {list(range(c.bins))[::-1]}"
        )


def load_score_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> ScoreConfig:
    """Read, override and validate a score config; raises ConfigError naming each bad key path."""
    return load_yaml_config(ScoreConfig, source, overrides)
