"""The outcome per text that :mod:`isdelta.score.predictor` fits against.

Two sources (``predictor.outcome``):

- ``label``: a field of each jsonl row (``predictor.label_field``): 0/1, true/false, or null for
  unknown (left out of the fit). Read before any model loads, so a bad label fails at once.
- ``answer``: the model answers the row's prompt itself, and the outcome is whether that answer
  is right. One completion per text is sampled with :func:`isdelta.engine.sample` (the run's
  sampler: the same logit transform, seeding and stop handling) from the row's
  ``answer.prompt_field`` (as a user chat turn with ``answer.chat``), and graded against the row's
  ``answer.answer_field`` by ``isdelta.training.REWARDS[answer.reward]`` (the run's reward rules).
  The statistics regressed on are still those of the scored text (``data.text_field``): with
  ``text_field: prompt`` and ``wrap: user`` this asks "does the model's uncertainty about a
  prompt predict whether it will solve it?" — the curriculum question. The answers are saved in
  ``OUT/outcome/answers.jsonl`` and reused while the settings, model and corpus are unchanged.

A corpus of the model's answers already graded (``label`` beside each answer, as the shipped
``builtin:math_answers``) asks the other question: does the entropy of an answer predict its
correctness?
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from isdelta.outputs import atomic_write
from isdelta.program import ConfigError, stamp_of
from isdelta.score.corpus import CorpusIndex, corpus_format
from isdelta.score.predictor import parse_label

__all__ = ["answer_outcomes", "build_predictor", "check_outcome_source", "corpus_rows", "read_clusters", "read_labels"]


def corpus_rows(data, corpus: Path, key: str = "predictor") -> CorpusIndex:
    """The corpus index; a ConfigError naming ``key`` unless the corpus is jsonl (rows hold fields)."""
    if corpus_format(corpus, data.format) != "jsonl":
        raise ConfigError(
            f"{key}: the outcome is read from jsonl fields, but data.path {corpus} is plain text",
            fix="give a jsonl corpus with a label (or prompt and answer) per row, or set predictor: null",
        )
    return CorpusIndex.build(data, corpus)


def read_labels(data, corpus: Path, label_field: str) -> np.ndarray:
    """float64 [n]: each text's label as 1.0 / 0.0, NaN where the row's label is null.

    A row without the field, or with a value that is not a label, is a ConfigError naming the
    text and ``predictor.label_field``.
    """
    index = corpus_rows(data, corpus)
    y = np.full(len(index.ids), np.nan)
    for i, row in enumerate(index.rows(range(len(index.ids)))):
        if label_field not in row:
            raise ConfigError(
                f"predictor.label_field: text {i} (id {index.ids[i]!r}) of {corpus} has no '{label_field}' field",
                f"its fields are {sorted(row)}",
                "add a 0/1 label to every row (null for unknown), set predictor.label_field, "
                "or use predictor.outcome: answer",
            )
        try:
            v = parse_label(row[label_field])
        except ValueError as e:
            raise ConfigError(
                f"predictor.label_field: text {i} (id {index.ids[i]!r}) has {label_field}={row[label_field]!r}",
                str(e),
                "use 0/1 or true/false",
            ) from None
        y[i] = np.nan if v is None else v
    return y


def read_clusters(data, corpus: Path, field: str) -> np.ndarray:
    """object [n]: each text's cluster label (as text); a ConfigError naming the first row without one."""
    index = corpus_rows(data, corpus)
    out = []
    for i, row in enumerate(index.rows(range(len(index.ids)))):
        if row.get(field) is None:
            raise ConfigError(
                f"predictor.cluster_field: text {i} (id {index.ids[i]!r}) of {corpus} has no '{field}'",
                f"its fields are {sorted(row)}",
                "give every row a cluster (e.g. its prompt's id), or set predictor.cluster_field: null",
            )
        out.append(str(row[field]))
    return np.asarray(out, dtype=object)


def _questions(data, corpus: Path, a) -> tuple[list[int], list[str], list[str], int]:
    """(positions, prompts, answers, n texts) of the rows holding both fields."""
    index = corpus_rows(data, corpus)
    pos, prompts, answers = [], [], []
    for i, row in enumerate(index.rows(range(len(index.ids)))):
        if isinstance(row.get(a.prompt_field), str) and row.get(a.answer_field) is not None:
            pos.append(i)
            prompts.append(row[a.prompt_field])
            answers.append(str(row[a.answer_field]))
    if not pos:
        raise ConfigError(
            f"predictor.answer: no row of {corpus} has both '{a.prompt_field}' (a string) and '{a.answer_field}'",
            fix="set predictor.answer.prompt_field / answer_field, or use predictor.outcome: label",
        )
    return pos, prompts, answers, len(index.ids)


def answer_outcomes(cfg, out: Path, corpus: Path, corpus_hash: str) -> tuple[np.ndarray, dict]:
    """float64 [n]: 1.0 where the model's sampled answer is right, 0.0 where wrong, NaN where the
    row has no prompt or answer; and a summary (model, reward, accuracy, where the answers are)."""
    p, a = cfg.predictor, cfg.predictor.answer
    name = a.model or p.model or cfg.names[0]
    i = cfg.names.index(name)
    pos, prompts, answers, n = _questions(cfg.data, corpus, a)
    folder = out / "outcome"
    stamp = stamp_of(
        {
            "answer": a.model_dump(mode="json", exclude={"model"}),
            "model": cfg.models[i].model_dump(mode="json", exclude={"name"}),
            "data": cfg.data.model_dump(mode="json"),
            "corpus": corpus_hash,
        }
    )
    path = folder / "answers.jsonl"
    stamp_path = folder / "stamp"
    if stamp_path.exists() and stamp_path.read_text().strip() == stamp and path.exists():
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        print(f"[isdelta] predictor: reusing {len(rows)} answers ({path})", file=sys.stderr)
    else:
        rows = _generate(cfg, i, pos, prompts, answers)
        folder.mkdir(parents=True, exist_ok=True)
        stamp_path.unlink(missing_ok=True)  # the answers below are valid only once the stamp is back
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write(stamp_path, stamp + "\n")
    y = np.full(n, np.nan)
    for r in rows:
        y[r["index"]] = r["label"]
    info = {
        "source": "answer",
        "model": name,
        "reward": a.reward,
        "n_answered": len(rows),
        "accuracy": float(np.mean([r["label"] for r in rows])),
        "answers": str(path),
    }
    return y, info


def _generate(cfg, i: int, pos: list[int], prompts: list[str], answers: list[str]) -> list[dict]:
    """Sample one answer per prompt from model ``i`` and grade it; rows for answers.jsonl."""
    from isdelta.engine import LogitTransform, sample
    from isdelta.training import REWARDS

    a = cfg.predictor.answer
    model, tok = cfg.models[i].load(f"models.{i}")
    chats = [[{"role": "user", "content": q}] for q in prompts] if a.chat else prompts
    try:
        s = sample(
            model,
            tok,
            chats,
            num_samples=1,
            transform=LogitTransform(a.temperature, a.top_k, a.top_p),
            max_new_tokens=a.max_new_tokens,
            stop_strings=a.stop_strings,
            seed=a.seed,
            token_budget=cfg.engine.token_budget,
            progress=False,
        )
    except ValueError as e:  # the prompts against the model's context, or a prompt it cannot encode
        raise ConfigError(
            f"predictor.answer: models.{i} cannot answer the corpus's prompts",
            str(e),
            "lower predictor.answer.max_new_tokens, or shorten those prompts",
        ) from None
    grade = REWARDS[a.reward]
    rows = []
    for p, q, ans, text, stop in zip(pos, prompts, answers, s.texts, s.stop_reason):
        reward = float(grade(text, ans))
        rows.append(
            {
                "index": p,
                "prompt": q,
                "answer": ans,
                "completion": text,
                "stop": stop,
                "reward": reward,
                "label": float(reward > 0),
            }
        )
    return rows


# ---------------------------------------------------------------------------- the predictor stage
def check_outcome_source(cfg, corpus: Path) -> None:
    """Before any model loads: the labels read and checked, or (answer mode) a jsonl corpus."""
    from isdelta.score.predictor import PredictorInputError, check_outcome

    p = cfg.predictor
    if p.cluster_field is not None:
        read_clusters(cfg.data, corpus, p.cluster_field)
    if p.outcome == "answer":
        _questions(cfg.data, corpus, p.answer)  # jsonl with prompts and answers, or a ConfigError
        return
    try:
        check_outcome(read_labels(cfg.data, corpus, p.label_field), f"predictor.label_field '{p.label_field}'")
    except PredictorInputError as e:
        raise ConfigError(str(e), fix="or set predictor: null") from None


def build_predictor(cfg, out: Path, corpus: Path, corpus_hash: str, columns) -> dict:
    """Logistic regressions of the outcome on the per-text statistics; writes ``OUT/predictor/``.

    ``columns(model_name, stats)`` returns that model's saved per-text columns (float64, NaN for
    a text with no scored token). An outcome that cannot be fitted (answer mode: all answers
    right or all wrong) gives ``{"skipped": why}``, never an exception after the scoring.
    """
    from isdelta.score import predictor as pr

    p = cfg.predictor
    if p.outcome == "label":
        y, info = read_labels(cfg.data, corpus, p.label_field), {"source": "label", "field": p.label_field}
    else:
        y, info = answer_outcomes(cfg, out, corpus, corpus_hash)
    name = p.model or cfg.names[0]
    specs, groups = pr.model_specs(p.last), pr.correlation_groups(p.last)
    stats = sorted({t.removeprefix("sqrt_") for terms in [*specs.values(), *groups.values()] for t in terms})
    cols = columns(name, stats)
    clusters = None if p.cluster_field is None else read_clusters(cfg.data, corpus, p.cluster_field)
    try:
        res = pr.analyse(y, cols, specs, groups, p.level, clusters)
    except pr.PredictorInputError as e:  # answer mode: known only after the answers (labels: checked first)
        res = {"skipped": str(e)}
    res = {"model": name, "outcome": info, **res}
    folder = out / "predictor"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "predictor.json", json.dumps(res, indent=2, allow_nan=False))
    if "fits" in res:
        atomic_write(folder / "predictor.csv", pr.fits_csv(res["fits"]))
        if cfg.output.plots:
            from isdelta.score.plots import plot_predictor

            keep = np.isfinite(y)
            plot_predictor(out / "plots" / "predictor.png", y[keep], {k: v[keep] for k, v in cols.items()}, res, p)
    return res
