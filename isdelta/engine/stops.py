"""Stop strings, applied after generation on the tokens::

    completion   t0  t1  t2  t3  t4  t5 ...
    decoded      "a" "b" "\\n" "\\n" "c" ...      stop string "\\n\\n"
    kept         t0  t1  t2  t3                  (the earliest prefix whose text holds the string)

The stop is a deterministic function of the prefix, so log p of the trimmed sequence is exact.
A stopping criterion ends such rows early (a speed-up only: the trim alone decides what is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from isdelta.engine.samples import StopReason

__all__ = ["StopStringCriterion", "check_stop_strings", "trim"]


def check_stop_strings(stop_strings: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a tuple; a bare str is one stop string, not a list of characters."""
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    out = tuple(stop_strings)
    if not all(isinstance(s, str) and s for s in out):
        raise ValueError(f"stop_strings must be non-empty strings; got {list(out)!r}.")
    return out


def _contains(text: str, stop_strings: tuple[str, ...]) -> bool:
    return any(s in text for s in stop_strings)


def _first_stop_string(tokens: list[int], stop_strings, tokenizer) -> int | None:
    """Smallest t with ``decode(tokens[:t+1])`` containing a stop string, or None.

    Binary search: containment in the decoded prefix only grows with the prefix.
    """
    dec = lambda n: tokenizer.decode(tokens[:n], skip_special_tokens=False)
    if not tokens or not _contains(dec(len(tokens)), stop_strings):
        return None
    lo, hi = 1, len(tokens)  # invariant: prefix of length hi contains one, of length lo - 1 not
    while lo < hi:
        mid = (lo + hi) // 2
        if _contains(dec(mid), stop_strings):
            hi = mid
        else:
            lo = mid + 1
    return hi - 1


def trim(tokens: list[int], eos: tuple[int, ...], stop_strings, tokenizer) -> tuple[list[int], StopReason]:
    """Kept tokens of one raw completion and why it ended (DESIGN.md §3)."""
    eos_set = set(eos)
    e = next((t for t, tok in enumerate(tokens) if tok in eos_set), None)
    before = tokens if e is None else tokens[:e]  # pads after a stop token are never real
    if stop_strings:
        t = _first_stop_string(before, stop_strings, tokenizer)
        if t is not None:
            return before[: t + 1], "stop_string"
    if e is not None:
        return tokens[: e + 1], "eos"
    return tokens, "length"


class StopStringCriterion:
    """Ends a row once its decoded completion holds a stop string (speed only; ``trim`` decides).

    Each step decodes only the last few tokens of each open row; a hit there is confirmed on the
    whole completion, so a row is never ended before its text holds a stop string. A missed hit
    only means the row runs on and is trimmed afterwards.
    """

    def __init__(self, tokenizer, stop_strings, prompt_width: int, eos: Sequence[int]) -> None:
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        self.window = max(len(s) for s in stop_strings) + 8
        self.eos = set(int(i) for i in eos)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        comp = input_ids[:, self.prompt_width :].tolist()  # [B·G, n_new]
        if self.done is None:
            self.done = torch.zeros(len(comp), dtype=torch.bool)
        for r, tokens in enumerate(comp):
            if self.done[r] or (tokens and tokens[-1] in self.eos):
                continue
            tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
            if _contains(tail, self.stop_strings) and _contains(
                self.tokenizer.decode(tokens, skip_special_tokens=False), self.stop_strings
            ):
                self.done[r] = True
        return self.done.to(input_ids.device)
