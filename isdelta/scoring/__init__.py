"""Dataset characterisation: per-text entropy, varentropy and NLL under one or more models.

The pieces behind ``python -m isdelta.score`` (see :mod:`isdelta.score`):

- ``corpus``      streaming jsonl / txt reading, with byte spans for re-reading one text
- ``scorer``      texts → engine rows (a one-token prefix or a chat template as context), torch
- ``stats``       per-text statistics from the engine's token arrays (numpy)
- ``store``       per-model result folders, appended chunk by chunk, resumable
- ``curriculum``  sort by a statistic, cut into bins, write shards + manifest + schedule (numpy)
- ``compare``     rank correlations, distances and a PCA across models (numpy + scipy)
- ``plots``       PNG plots (matplotlib, imported when drawing)
- ``config``      the score.yaml schema (pydantic)

Only ``scorer`` imports torch; the others can be used on saved ``stats.jsonl`` files alone.
"""
