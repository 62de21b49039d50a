"""score.yaml as frozen pydantic models (the conventions of :mod:`isdelta.program`).

Unknown keys are rejected with the list of valid ones, every error names its key path
(``models.1.temperature``), and ``--set a.b=value`` overrides are type-checked the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from isdelta.program import ModelConfig, Section, load_yaml_config
from isdelta.program.config import checked_by
from isdelta.score.stats import KEY_STATS

__all__ = ["ScoreConfig", "load_score_config", "parse_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# ranges the library declares, checked by it when a value is read (imported then: this module
# stays free of torch); the messages give each range's reason
_TRANSFORM = checked_by("isdelta.engine.transform:LogitTransform")  # temperature, top_k, top_p
_SAMPLE = checked_by("isdelta.engine.sampling:check_sample_options")  # seed


class ScoreModel(ModelConfig):
    # the run's model section plus a name (folder and column label) and the scoring temperature
    name: str | None = Field(None, description="default: the path's last part, plus -T<t> when t != 1")
    temperature: Annotated[float, _TRANSFORM] = 1.0  # scores logits / T: the tempered distribution's entropy


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
    # a statistic, or a combined key {stat: weight}, e.g. entropy − λ·√varentropy as
    # {entropy_mean: 1.0, sqrt_varentropy_mean: -0.5}; "sqrt_STAT" is √STAT, "STAT@name" reads
    # another model's statistic
    key: str | dict[str, float] = "entropy_mean"
    standardize: bool = False  # z-score each term before combining (terms in different units)
    bins: int = Field(4, ge=1)
    binning: Literal["count", "width"] = "count"  # equal numbers of texts, or equal key ranges
    # bin order: increasing, decreasing, a permutation of the bins, or sawtooth: `cycles` rising
    # ramps 0..k-1, each taking every cycles-th text of each bin (every text once)
    schedule: Literal["increasing", "decreasing", "sawtooth"] | list[int] = "increasing"
    cycles: int | None = Field(None, ge=1)  # schedule: sawtooth only: the number of ramps


class CompareConfig(Section):
    stat: str = "entropy_mean"  # the per-text statistic compared across models
    distance: Literal["rmse", "mean_abs", "one_minus_spearman"] = "rmse"


class AnswerOutcome(Section):
    # predictor.outcome: answer — the model answers each row's prompt, graded against its answer
    model: str | None = None  # which model answers; default predictor.model
    prompt_field: str = "prompt"  # the question (a user chat turn when chat is true)
    answer_field: str = "answer"  # the reference answer
    reward: str = "answer_match"  # a rule of isdelta.training.REWARDS (answer_match, boxed_match)
    chat: bool = True  # render the prompt with the tokenizer's chat template
    max_new_tokens: int = Field(64, ge=1)
    temperature: Annotated[float, _TRANSFORM] = 1.0  # the sampling transform (isdelta.engine.LogitTransform)
    top_k: Annotated[int | None, _TRANSFORM] = None  # 0 or null: off
    top_p: Annotated[float, _TRANSFORM] = 1.0
    stop_strings: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    seed: Annotated[int, _SAMPLE] = 0


class PredictorConfig(Section):
    model: str | None = None  # whose per-text statistics are the regressors; default the first model
    outcome: Literal["label", "answer"] = "label"  # a corpus field, or the model's own answer graded
    label_field: str = "label"  # outcome: label — 0/1 or true/false per row (null: unknown)
    answer: AnswerOutcome = AnswerOutcome()  # outcome: answer
    # the last-token distribution: the one predicting the text's last token, or the one after it
    last: Literal["entropy_last", "entropy_next"] = "entropy_last"
    level: float = Field(0.95, gt=0, lt=1)  # confidence level of the coefficient intervals
    # a field naming each text's cluster (e.g. the prompt several answers share): cluster-robust
    # SEs, since texts of one cluster are not independent; null: every text independent
    cluster_field: str | None = None
    plot_bins: int = Field(6, ge=2)  # entropy bins of the outcome-rate plot (equal counts)


class ScoreOutput(Section):
    dir: str = "runs/score"
    plots: bool = True


class ScoreConfig(Section):
    models: list[ScoreModel] = Field(min_length=1)
    data: ScoreData
    engine: ScoreEngine = ScoreEngine()
    curriculum: CurriculumConfig | None = CurriculumConfig()
    compare: CompareConfig | None = CompareConfig()  # used with two models or more
    predictor: PredictorConfig | None = None  # entropy as a predictor of an outcome per text
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
        if self.predictor is not None:
            _check_predictor(self.predictor, names)
        if self.compare is not None and self.compare.stat not in KEY_STATS:
            raise ValueError(f"compare.stat {self.compare.stat!r} is not a statistic; choose one of {list(KEY_STATS)}")
        return self


def _model_name(m: ScoreModel) -> str:
    if m.name:
        return m.name
    base = Path(m.path).stem if m.path.lower().endswith(".gguf") else Path(m.path.rstrip("/")).name
    return base + (f"-T{m.temperature:g}" if m.temperature != 1.0 else "")


def parse_key(key: str | dict[str, float], default_model: str) -> list[tuple[str, str, float]]:
    """The curriculum key as (statistic, model name, weight) terms (a statistic may be ``sqrt_STAT``)."""
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
        if stat.removeprefix("sqrt_") not in KEY_STATS:
            raise ValueError(
                f"curriculum.key: {stat!r} is not a statistic; choose from {list(KEY_STATS)} "
                "(optionally as sqrt_STAT for its square root, or STAT@model_name)"
            )
        if model not in names:
            raise ValueError(f"curriculum.key: model {model!r} (in {stat}@{model}) is none of {list(names)}")
    if isinstance(c.schedule, list) and sorted(c.schedule) != list(range(c.bins)):
        raise ValueError(
            f"curriculum.schedule {c.schedule} is not a permutation of the bin indices "
            f"0..{c.bins - 1}; give each bin once, e.g. {list(range(c.bins))[::-1]}"
        )
    if c.schedule == "sawtooth" and c.cycles is None:
        raise ValueError("curriculum.schedule: sawtooth needs curriculum.cycles (the number of ramps, e.g. 2)")
    if c.schedule != "sawtooth" and c.cycles is not None:
        raise ValueError(
            f"curriculum.cycles is only used with schedule: sawtooth (schedule is {c.schedule!r}); remove it"
        )


def _check_predictor(p: PredictorConfig, names: tuple[str, ...]) -> None:
    for key, name in (("predictor.model", p.model), ("predictor.answer.model", p.answer.model)):
        if name is not None and name not in names:
            raise ValueError(f"{key} {name!r} is none of the models {list(names)}")
    from isdelta.training.rewards import REWARDS

    if p.answer.reward not in REWARDS:
        raise ValueError(
            f"predictor.answer.reward {p.answer.reward!r} is not a reward rule; choose one of {list(REWARDS)}"
        )


def load_score_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> ScoreConfig:
    """Read, override and validate a score config; raises ConfigError naming each bad key path."""
    return load_yaml_config(ScoreConfig, source, overrides)
