"""The estimators' options: their valid values and the checks that name a bad one (TypeError for
a wrong type, ValueError for a wrong value, the argument's name first)."""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np

__all__ = ["INCLUDES", "PROMPTS", "SCHEMES", "Scheme", "check_options", "check_support_size"]

Scheme = Literal["none", "psis", "truncate", "clip"]
SCHEMES: tuple[str, ...] = ("none", "psis", "truncate", "clip")  # weight schemes (weights.py)
INCLUDES = ("all", "no_eos")
PROMPTS = ("fixed", "sampled")


def check_support_size(support_size) -> None:
    """``support_size`` is None or a whole number ≥ 1 (the tokens a next-token distribution spans)."""
    if support_size is None:
        return
    if isinstance(support_size, bool) or not isinstance(support_size, numbers.Integral):
        raise TypeError(
            f"support_size: expected the number of tokens a next-token distribution can spread over "
            f"(an int: the vocabulary size, or top-k), got {type(support_size).__name__} {support_size!r}; "
            "pass e.g. support_size=model.config.vocab_size, or None when unknown."
        )
    if support_size < 1:
        raise ValueError(
            f"support_size: expected the number of tokens a next-token distribution can spread over "
            f"(≥ 1: the vocabulary size, or top-k), got {support_size}; pass the vocabulary size, or None."
        )


_UNSET = object()  # ``scheme`` not passed (None is a bad value, not "absent")


def check_options(
    *,
    weights: str = "none",
    include: str = "all",
    prompts: str = "fixed",
    level: float = 0.95,
    clip: float | None = None,
    scheme=_UNSET,
) -> None:
    """Validate the string options, ``level`` and ``clip`` (``scheme``: the weights option under
    the name ``importance_weights`` gives it)."""
    arg = "weights"
    if scheme is not _UNSET:
        weights, arg = scheme, "scheme"
    for name, value, valid in ((arg, weights, SCHEMES), ("include", include, INCLUDES), ("prompts", prompts, PROMPTS)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected one of {list(valid)} (a string), got {type(value).__name__} {value!r}.")
        if value not in valid:
            raise ValueError(f"{name}: expected one of {list(valid)}, got {value!r}.")
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(
            f"level: expected a coverage probability in (0, 1) (a float, e.g. 0.95), got {type(level).__name__} "
            f"{level!r}."
        )
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected a coverage probability in (0, 1), got {level!r}.")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)):
        raise TypeError(f"clip: expected a number, the cap c > 0 on r = p1/p0, got {type(clip).__name__} {clip!r}.")
    if weights == "clip":
        if clip is None or not np.isfinite(clip) or clip <= 0:
            raise ValueError(f"clip: {arg}='clip' needs a finite cap c > 0 on r, got {clip!r}.")
    elif clip is not None:
        raise ValueError(
            f"clip: only used with {arg}='clip', got clip={clip!r} with {arg}={weights!r}; "
            f"drop clip or set {arg}='clip'."
        )
