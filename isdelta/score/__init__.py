"""The corpus program, ``python -m isdelta.score cfg.yaml``: per-text entropy, varentropy and NLL
under one or more models, curricula and model comparisons.

- ``config``      the score.yaml schema (pydantic)
- ``corpus``      streaming jsonl / txt reading, with byte spans for re-reading one text
- ``scorer``      texts → engine rows (a one-token prefix or a chat template as context), torch
- ``stats``       per-text statistics from the engine's token arrays (numpy)
- ``store``       per-model result folders, appended chunk by chunk, resumable
- ``curriculum``  sort by a statistic, cut into bins, write shards + manifest + schedule (numpy)
- ``compare``     rank correlations, distances and a PCA across models (numpy + scipy)
- ``predictor``   logistic regressions of an outcome on entropy, correlation matrices (statsmodels)
- ``outcome``     the outcome per text: a corpus label, or the model's own answer graded (torch)
- ``pipeline``    the driver (scoring every model, derived outputs) and ``main``
- ``report``      summary.md; ``plots`` the PNGs (matplotlib, imported when drawing)

Only ``scorer`` and ``outcome`` (its answer mode) import torch; the others can be used on saved ``stats.jsonl`` files alone.
"""

from __future__ import annotations

from isdelta.score.pipeline import main, score, score_models

__all__ = ["main", "score", "score_models"]
