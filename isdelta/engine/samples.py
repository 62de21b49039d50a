"""The sampler's result, :class:`Samples`: the rollouts, their decoded texts and how each
stopped (and, from a sampler other than the engine's p0, its log-prob of each sampled token), with
atomic save / load so a long run resumes from its saved parts."""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from isdelta.engine.rollouts import Rollouts
from isdelta.engine.transform import LogitTransform
from isdelta.outputs import atomic_write

__all__ = ["Samples", "StopReason", "prompt_seed"]

StopReason = Literal["eos", "stop_string", "length"]
Backend = Literal["hf", "vllm"]
_SIDECAR_VERSION = 1


@dataclass(frozen=True)
class Samples:
    """G completions per prompt drawn from p0 (or from a proposal q: see ``token_logq``), in the
    isdelta layout.

    Attributes
    ----------
    rollouts : Rollouts
        Prompt-major rows (r = p·G + g, ``group[r] = p``); the counted tokens follow DESIGN.md §3.
    texts : tuple of str [N]
        Decoded kept completions, special tokens removed (a stop string that ended a row stays in
        its text, as does the rest of the token that completed it).
    prompt_texts : tuple of str [P]
        Each prompt as the model saw it (chat prompts rendered by the chat template).
    stop_reason : tuple of str [N]
        ``"eos"`` (a stop token was sampled), ``"stop_string"`` (trimmed after a stop string) or
        ``"length"`` (cut at ``max_new_tokens``).
    transform : LogitTransform
        The sampling distribution; score both models with it.
    num_samples, max_new_tokens, seed : int
    stop_strings : tuple of str
    backend : {"hf", "vllm"}
        The sampler: HF ``generate`` on the engine's own model, or vLLM.
    token_logq : Tensor, float32 [N, C], optional
        The sampler's own processed log-prob of each sampled token, log q (vLLM's
        ``logprobs_mode="processed_logprobs"``), on the completion columns of ``rollouts``: finite
        and <= 0 where ``rollouts.completion_mask`` counts a token (the stop token included), 0
        elsewhere. None for the HF back end (its q is the engine's p0). Pass it to the
        estimators as ``token_logq=`` (``estimate_tokens``) and, summed over the counted
        columns, ``log_q=`` (``estimate``).
    """

    rollouts: Rollouts
    texts: tuple[str, ...]
    prompt_texts: tuple[str, ...]
    stop_reason: tuple[str, ...]
    transform: LogitTransform
    num_samples: int
    max_new_tokens: int
    seed: int = 0
    stop_strings: tuple[str, ...] = field(default=())
    backend: Backend = "hf"
    token_logq: torch.Tensor | None = None

    def __post_init__(self) -> None:
        N, P = self.rollouts.n_rows, len(self.prompt_texts)
        if len(self.texts) != N or len(self.stop_reason) != N:
            raise ValueError(
                f"texts ({len(self.texts)}) and stop_reason ({len(self.stop_reason)}) "
                f"must have one entry per rollout row ({N})."
            )
        if self.rollouts.n_prompts != P:
            raise ValueError(
                f"prompt_texts has {P} entries but the rollouts hold {self.rollouts.n_prompts} prompt groups."
            )
        bad = set(self.stop_reason) - {"eos", "stop_string", "length"}
        if bad:
            raise ValueError(f"stop_reason must be 'eos', 'stop_string' or 'length'; got {sorted(bad)}.")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be 'hf' or 'vllm'; got {self.backend!r}.")
        if self.token_logq is not None:
            _check_token_logq(self.token_logq, self.rollouts.completion_mask)

    @property
    def n_rows(self) -> int:
        return self.rollouts.n_rows

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_texts)

    @property
    def stopped(self) -> np.ndarray:
        """bool [N]: the row ended by a stop token or a stop string (not cut at the length limit)."""
        return np.array([r != "length" for r in self.stop_reason], dtype=bool)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per row (for a csv or jsonl): indices, texts, lengths, stop reason."""
        group = self.rollouts.group.tolist()
        lengths = self.rollouts.lengths.tolist()
        seen: Counter = Counter()
        records = []
        for r, (p, text, reason, L) in enumerate(zip(group, self.texts, self.stop_reason, lengths)):
            records.append(
                {
                    "row": r,
                    "prompt": p,
                    "sample": seen[p],
                    "prompt_text": self.prompt_texts[p],
                    "text": text,
                    "length": L,
                    "stop_reason": reason,
                    "stopped": reason != "length",
                }
            )
            seen[p] += 1
        return records

    def to_dict(self) -> dict[str, Any]:
        """Summary (no per-row data): sizes, options and how the rows ended."""
        return {
            "n_prompts": self.n_prompts,
            "num_samples": self.num_samples,
            "n_rows": self.n_rows,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "stop_strings": list(self.stop_strings),
            "transform": self.transform.to_dict(),
            "stop_reasons": dict(Counter(self.stop_reason)),
            "mean_length": float(self.rollouts.lengths.double().mean()),
            "backend": self.backend,
            "token_logq": self.token_logq is not None,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors to ``path`` (a ``.pt``) and the texts to a ``.json`` beside it.

        Both files are written atomically (temporary file, then rename) and share a random
        ``save_id``, so :meth:`load` never trusts a half-written or mismatched pair (a run that
        died between the two writes resamples instead of resuming from garbage).
        """
        pt, js = _paths(path)
        ro, save_id = self.rollouts, uuid.uuid4().hex
        meta = {
            "version": _SIDECAR_VERSION,
            "save_id": save_id,
            "texts": list(self.texts),
            "prompt_texts": list(self.prompt_texts),
            "stop_reason": list(self.stop_reason),
            "transform": self.transform.to_dict(),
            "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "stop_strings": list(self.stop_strings),
            "backend": self.backend,
        }
        tensors = {
            "input_ids": ro.input_ids.cpu(),
            "attention_mask": ro.attention_mask.cpu(),
            "completion_mask": ro.completion_mask.cpu(),
            "group": ro.group.cpu(),
            "prompt_len": int(ro.prompt_len),
            "eos_token_ids": list(ro.eos_token_ids),
            "save_id": save_id,
        }
        if self.token_logq is not None:
            tensors["token_logq"] = self.token_logq.cpu()
        pt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(js, json.dumps(meta, ensure_ascii=False))
        atomic_write(pt, lambda f: torch.save(tensors, f))

    @classmethod
    def from_tokens(
        cls,
        prompt_ids,
        completions: list[list[int]],
        stop_reason: list[str],
        prompt_texts,
        tokenizer,
        *,
        eos: tuple[int, ...],
        pad: int,
        transform: LogitTransform,
        num_samples: int,
        max_new_tokens: int,
        seed: int,
        stop_strings: tuple[str, ...],
        backend: Backend = "hf",
        logq_rows: list[list[float]] | None = None,
    ) -> Samples:
        """A sampler's kept completions (token lists, prompt-major) as Samples: the rollouts
        layout, the decoded texts and, from ``logq_rows`` (one log q per kept token), ``token_logq``."""
        rollouts = Rollouts.from_token_lists(list(prompt_ids), completions, eos_token_ids=eos, pad_token_id=pad)
        token_logq = None
        if logq_rows is not None:
            token_logq = torch.zeros(rollouts.completion_mask.shape, dtype=torch.float32)  # [N, C]
            for r, row in enumerate(logq_rows):
                token_logq[r, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return cls(
            rollouts,
            tuple(tokenizer.decode(c, skip_special_tokens=True) for c in completions),
            tuple(prompt_texts),
            tuple(stop_reason),
            transform,
            int(num_samples),
            int(max_new_tokens),
            int(seed),
            stop_strings,
            backend=backend,
            token_logq=token_logq,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Samples:
        """Read what :meth:`save` wrote (``torch.load(weights_only=True)``: no code runs)."""
        pt, js = _paths(path)
        missing = [str(p) for p in (pt, js) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"saved samples incomplete: {missing} missing. Samples.save "
                "writes both a .pt and a .json; resample to recreate them."
            )
        t = torch.load(pt, map_location="cpu", weights_only=True)
        meta = json.loads(js.read_text())
        if meta.get("version") != _SIDECAR_VERSION or meta.get("save_id") != t.get("save_id"):
            raise ValueError(
                f"{pt} and {js} do not belong to the same save (save_id or version "
                "differ): the run was interrupted while saving. Delete both and resample."
            )
        ro = Rollouts(
            t["input_ids"],
            t["attention_mask"],
            int(t["prompt_len"]),
            t["completion_mask"],
            t["group"],
            tuple(int(i) for i in t["eos_token_ids"]),
        )
        return cls(
            ro,
            tuple(meta["texts"]),
            tuple(meta["prompt_texts"]),
            tuple(meta["stop_reason"]),
            LogitTransform(**meta["transform"]),
            int(meta["num_samples"]),
            int(meta["max_new_tokens"]),
            int(meta["seed"]),
            tuple(meta["stop_strings"]),
            meta.get("backend", "hf"),  # saves from before the vLLM back end are HF's
            t.get("token_logq"),
        )


def prompt_seed(seed: int, b: int) -> int:
    """A seed for micro-batch (HF) or prompt (vLLM) b that differs across (seed, b) pairs (seed + b
    would collide); both back ends of :func:`isdelta.engine.sampling.sample` seed with it."""
    return int(np.random.SeedSequence([int(seed), int(b)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_token_logq(token_logq, completion_mask: torch.Tensor) -> None:
    """ValueError unless ``token_logq`` is a float32 [N, C] tensor, finite and <= 0 on the counted
    columns and 0 elsewhere."""
    if not isinstance(token_logq, torch.Tensor) or token_logq.dtype != torch.float32:
        got = token_logq.dtype if isinstance(token_logq, torch.Tensor) else type(token_logq).__name__
        raise TypeError(
            f"token_logq must be a float32 tensor [N, C]; got {got}. Pass torch.as_tensor(x, dtype=torch.float32)."
        )
    if token_logq.shape != completion_mask.shape:
        raise ValueError(
            f"token_logq has shape {tuple(token_logq.shape)} but the rollouts' completion columns are "
            f"{tuple(completion_mask.shape)}: one log q per completion column, rows prompt-major."
        )
    m = completion_mask.to(token_logq.device).bool()
    bad = m & ~(torch.isfinite(token_logq) & (token_logq <= 0))
    if bad.any():
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"token_logq of rows {rows[:8]} is non-finite or positive at counted tokens: the sampler drew "
            "them, so log q is finite and <= 0. Check that it returned the sampled tokens' log-probs."
        )
    stray = (~m) & (token_logq != 0)
    if stray.any():
        rows = sorted(set(stray.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"token_logq of rows {rows[:8]} is non-zero past the counted tokens; set it to 0 there "
            "(those columns are pads or trimmed tokens)."
        )


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    pt = Path(path)
    if pt.suffix != ".pt":
        raise ValueError(
            f"samples path must end in '.pt' (the texts go to a '.json' beside it); "
            f"got {str(pt)!r}. Pass e.g. 'run/samples.pt'."
        )
    return pt, pt.with_suffix(".json")
