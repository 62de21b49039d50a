"""Drawing G completions per prompt from p0 (DESIGN.md §2–§3).

HF ``generate`` samples from whatever its ``generation_config`` says, and a checkpoint's config
often says more than we want (``top_k=50`` as a global default, ``repetition_penalty=1.05`` in
Qwen's). Every such processor changes the sampling distribution without changing how the engine
scores it, which biases every importance weight. So :func:`sample` passes the transform's
temperature / top-k / top-p explicitly and forces every other logit processor to neutral.

Stop strings are applied after generation, on the tokens::

    completion   t0  t1  t2  t3  t4  t5 ...
    decoded      "a" "b" "\\n" "\\n" "c" ...      stop string "\\n\\n"
    kept         t0  t1  t2  t3                  (the earliest prefix whose text holds the string)

The stop is a deterministic function of the prefix, so log p of the trimmed sequence is exact.
A stopping criterion ends such rows early (a speed-up only: the trim alone decides what is kept).
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from isdelta.engine.masking import normalise_eos_ids
from isdelta.engine.rollouts import Rollouts
from isdelta.engine.transform import LogitTransform
from isdelta.outputs import atomic_write

__all__ = ["Samples", "sample"]

StopReason = Literal["eos", "stop_string", "length"]
Prompt = str | Sequence[dict]

# generate() arguments that make its sampling distribution exactly the LogitTransform's: each
# turns off a logit processor that a checkpoint's generation_config may switch on. Keys this
# transformers version does not know are dropped (they would reach the model's forward).
_NEUTRAL = {
    "num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "top_h": None, "guidance_scale": None, "sequence_bias": None,
    "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "renormalize_logits": False,
    "watermarking_config": None, "stop_strings": None, "max_time": None,
    "penalty_alpha": None, "dola_layers": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "prompt_lookup_num_tokens": None, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False,
}
_SIDECAR_VERSION = 1


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Samples:
    """G completions per prompt drawn from p0, in the isdelta layout.

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

    def __post_init__(self) -> None:
        N, P = self.rollouts.n_rows, len(self.prompt_texts)
        if len(self.texts) != N or len(self.stop_reason) != N:
            raise ValueError(f"texts ({len(self.texts)}) and stop_reason ({len(self.stop_reason)}) "
                             f"must have one entry per rollout row ({N}).")
        if self.rollouts.n_prompts != P:
            raise ValueError(f"prompt_texts has {P} entries but the rollouts hold "
                             f"{self.rollouts.n_prompts} prompt groups.")
        bad = set(self.stop_reason) - {"eos", "stop_string", "length"}
        if bad:
            raise ValueError(f"stop_reason must be 'eos', 'stop_string' or 'length'; got {sorted(bad)}.")

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
            records.append({"row": r, "prompt": p, "sample": seen[p], "prompt_text": self.prompt_texts[p],
                            "text": text, "length": L, "stop_reason": reason,
                            "stopped": reason != "length"})
            seen[p] += 1
        return records

    def to_dict(self) -> dict[str, Any]:
        """Summary (no per-row data): sizes, options and how the rows ended."""
        return {"n_prompts": self.n_prompts, "num_samples": self.num_samples, "n_rows": self.n_rows,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "stop_strings": list(self.stop_strings), "transform": self.transform.to_dict(),
                "stop_reasons": dict(Counter(self.stop_reason)),
                "mean_length": float(self.rollouts.lengths.double().mean())}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors to ``path`` (a ``.pt``) and the texts to a ``.json`` beside it.

        Both files are written atomically (temporary file, then rename) and share a random
        ``save_id``, so :meth:`load` never trusts a half-written or mismatched pair (a run that
        died between the two writes resamples instead of resuming from garbage).
        """
        pt, js = _paths(path)
        ro, save_id = self.rollouts, uuid.uuid4().hex
        meta = {"version": _SIDECAR_VERSION, "save_id": save_id, "texts": list(self.texts),
                "prompt_texts": list(self.prompt_texts), "stop_reason": list(self.stop_reason),
                "transform": self.transform.to_dict(), "num_samples": self.num_samples,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "stop_strings": list(self.stop_strings)}
        tensors = {"input_ids": ro.input_ids.cpu(), "attention_mask": ro.attention_mask.cpu(),
                   "completion_mask": ro.completion_mask.cpu(), "group": ro.group.cpu(),
                   "prompt_len": int(ro.prompt_len), "eos_token_ids": list(ro.eos_token_ids),
                   "save_id": save_id}
        pt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(js, json.dumps(meta, ensure_ascii=False))
        atomic_write(pt, lambda f: torch.save(tensors, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Samples:
        """Read what :meth:`save` wrote (``torch.load(weights_only=True)``: no code runs)."""
        pt, js = _paths(path)
        missing = [str(p) for p in (pt, js) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"saved samples incomplete: {missing} missing. Samples.save "
                                    "writes both a .pt and a .json; resample to recreate them.")
        t = torch.load(pt, map_location="cpu", weights_only=True)
        meta = json.loads(js.read_text())
        if meta.get("version") != _SIDECAR_VERSION or meta.get("save_id") != t.get("save_id"):
            raise ValueError(f"{pt} and {js} do not belong to the same save (save_id or version "
                             "differ): the run was interrupted while saving. Delete both and resample.")
        ro = Rollouts(t["input_ids"], t["attention_mask"], int(t["prompt_len"]), t["completion_mask"],
                      t["group"], tuple(int(i) for i in t["eos_token_ids"]))
        return cls(ro, tuple(meta["texts"]), tuple(meta["prompt_texts"]), tuple(meta["stop_reason"]),
                   LogitTransform(**meta["transform"]), int(meta["num_samples"]),
                   int(meta["max_new_tokens"]), int(meta["seed"]), tuple(meta["stop_strings"]))


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    pt = Path(path)
    if pt.suffix != ".pt":
        raise ValueError(f"samples path must end in '.pt' (the texts go to a '.json' beside it); "
                         f"got {str(pt)!r}. Pass e.g. 'run/samples.pt'.")
    return pt, pt.with_suffix(".json")


# ---------------------------------------------------------------------------- public
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    num_samples: int,
    transform: LogitTransform,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    seed: int = 0,
    eos_token_ids: int | Sequence[int] | None = None,
    prompt_batch_size: int | None = None,
    token_budget: int = 2**16,
    progress: bool = True,
) -> Samples:
    """Draw ``num_samples`` completions per prompt from ``model`` under ``transform``.

    Parameters
    ----------
    model : HF causal LM
        Sampled in eval mode (dropout off); its mode is restored afterwards.
    tokenizer : HF tokenizer of the model
    prompts : list of str, or list of chat message lists
        A str is tokenized as the tokenizer does by default (``add_special_tokens=True``); a list
        of ``{"role": ..., "content": ...}`` dicts is rendered with
        ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
    num_samples : int
        G, completions per prompt.
    transform : LogitTransform
        The sampling distribution. Every other logit processor of ``model.generation_config``
        (repetition penalty, min-p, typical-p, n-gram bans, ...) is forced to neutral, with a
        warning naming what was overridden.
    max_new_tokens : int
    stop_strings : sequence of str
        A completion is trimmed after the earliest token whose decoded prefix (special tokens
        kept) contains one of them; it then has no stop token and all its kept tokens count.
    seed : int
        Micro-batch b is seeded with ``SeedSequence([seed, b])``; the caller's RNG state is
        restored afterwards. Samples are reproducible for the same seed, prompt batching,
        device and library versions.
    eos_token_ids : int or sequence of int, optional
        Stop-token ids. Default: ``tokenizer.eos_token_id`` plus ``model.generation_config``'s.
    prompt_batch_size : int, optional
        Prompts per ``generate`` call; default: as many as fit ``token_budget``.
    token_budget : int
        Most tokens (rows × (prompt width + max_new_tokens)) in one ``generate`` call.
    progress : bool
        Show a progress bar over prompts.

    Returns
    -------
    Samples
        Prompt-major rows r = p·G + g.
    """
    _check_args(num_samples, max_new_tokens, transform, prompt_batch_size, token_budget)
    stop_strings = _check_stop_strings(stop_strings)
    eos = _default_eos_ids(model, tokenizer, eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompt_ids, prompt_texts = _encode_prompts(tokenizer, prompts)
    gen_kwargs = {**_neutral_kwargs(model), **transform.generate_kwargs(),
                  "max_new_tokens": int(max_new_tokens), "num_return_sequences": int(num_samples),
                  "pad_token_id": int(pad), "eos_token_id": list(eos)}
    batches = _prompt_batches([len(p) for p in prompt_ids], num_samples, max_new_tokens,
                              prompt_batch_size, token_budget)
    completions, reasons = [], []
    bar = tqdm(total=len(prompt_ids), desc="sampling", unit="prompt", leave=False,
               disable=True if not progress else None)
    was_training = model.training
    model.eval()  # dropout off: p0 is the model's deterministic distribution
    try:
        for b, idx in enumerate(batches):
            out = _generate_batch(model, tokenizer, [prompt_ids[i] for i in idx], int(pad),
                                  gen_kwargs, stop_strings, _batch_seed(seed, b))
            for tokens in out:
                kept, reason = _trim(tokens, eos, stop_strings, tokenizer)
                completions.append(kept)
                reasons.append(reason)
            bar.update(len(idx))
    finally:
        model.train(was_training)
        bar.close()
    rollouts = Rollouts.from_token_lists(prompt_ids, completions, eos_token_ids=eos, pad_token_id=pad)
    texts = tuple(tokenizer.decode(c, skip_special_tokens=True) for c in completions)
    return Samples(rollouts, texts, tuple(prompt_texts), tuple(reasons), transform, int(num_samples),
                   int(max_new_tokens), int(seed), stop_strings)


# ---------------------------------------------------------------------------- arguments
def _check_args(num_samples, max_new_tokens, transform, prompt_batch_size, token_budget) -> None:
    """Raise ValueError/TypeError on bad scalar options."""
    if not isinstance(transform, LogitTransform):
        raise TypeError(f"transform must be an isdelta LogitTransform; got {type(transform).__name__}. "
                        "Build one with LogitTransform(temperature=..., top_k=..., top_p=...).")
    for name, v in [("num_samples", num_samples), ("max_new_tokens", max_new_tokens),
                    ("token_budget", token_budget)] + (
                       [("prompt_batch_size", prompt_batch_size)] if prompt_batch_size is not None else []):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")


def _check_stop_strings(stop_strings: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a tuple; a bare str is one stop string, not a list of characters."""
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    out = tuple(stop_strings)
    if not all(isinstance(s, str) and s for s in out):
        raise ValueError(f"stop_strings must be non-empty strings; got {list(out)!r}.")
    return out


def _default_eos_ids(model, tokenizer, eos_token_ids) -> tuple[int, ...]:
    """The stop ids: the given ones, else the tokenizer's EOS plus the generation_config's."""
    if eos_token_ids is None:
        gc = getattr(model, "generation_config", None)
        ids = [tokenizer.eos_token_id, getattr(gc, "eos_token_id", None)]
        flat = [i for x in ids if x is not None for i in ([x] if isinstance(x, int) else list(x))]
        eos_token_ids = flat
    eos = normalise_eos_ids(eos_token_ids)
    if not eos:
        raise ValueError("no stop-token id: the tokenizer has no eos_token_id and the model's "
                         "generation_config none either. Pass eos_token_ids=[...] explicitly.")
    return eos


def _encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (chat prompts rendered by the chat template)."""
    if isinstance(prompts, (str, dict)) or len(prompts) == 0:
        got = f"{type(prompts).__name__}{'' if prompts else ' (empty)'}"
        raise ValueError("prompts must be a non-empty list of str or of chat message lists; got "
                         f"{got}. Wrap a single prompt as [prompt].")
    ids, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            text, special = p, True
        elif isinstance(p, Sequence) and all(isinstance(m, dict) and "role" in m for m in p):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"prompt {i} is a chat (a list of messages) but the tokenizer has no "
                                 "chat_template. Pass plain str prompts, or set tokenizer.chat_template.")
            text = tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            special = False  # the template already holds BOS and the role markers
        else:
            raise ValueError(f"prompt {i} must be a str or a list of {{'role', 'content'}} dicts; "
                             f"got {type(p).__name__}: {str(p)[:80]!r}.")
        tok = tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(tok) == 0:
            raise ValueError(f"prompt {i} tokenizes to no tokens ({text!r}); every prompt needs at "
                             "least one token to condition the first completion token on.")
        ids.append(list(tok))
        texts.append(text)
    return ids, texts


def _neutral_kwargs(model) -> dict[str, Any]:
    """generate() kwargs that switch off every processor outside the transform (warns on overrides)."""
    from transformers import GenerationConfig

    blank = GenerationConfig()
    kwargs = {k: v for k, v in _NEUTRAL.items() if hasattr(blank, k)}
    gc = getattr(model, "generation_config", None)
    overridden = []
    for k, v in kwargs.items():
        cur = getattr(gc, k, None) if gc is not None else None
        if cur is not None and cur != v and k not in ("output_scores", "return_dict_in_generate",
                                                       "output_logits", "min_length"):
            overridden.append(f"{k}={cur!r}")
    if overridden:
        warnings.warn(
            f"model.generation_config sets {', '.join(overridden)}; isdelta samples p0 from the "
            "LogitTransform alone (the engine scores only temperature/top-k/top-p), so these are "
            "overridden to neutral. To sample with them, they would have to be scored too.",
            stacklevel=3)
    return kwargs


def _prompt_batches(n_tokens: list[int], G: int, max_new_tokens: int, prompt_batch_size: int | None,
                    token_budget: int) -> list[list[int]]:
    """Contiguous prompt-index batches: at most ``prompt_batch_size`` prompts, or within the budget."""
    batches, cur, width = [], [], 0
    for i, n in enumerate(n_tokens):
        w = max(width, n)
        full = (len(cur) >= prompt_batch_size if prompt_batch_size is not None
                else (len(cur) + 1) * G * (w + max_new_tokens) > token_budget)
        if cur and full:
            batches.append(cur)
            cur, w = [], n
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def _batch_seed(seed: int, b: int) -> int:
    """A seed for micro-batch b that differs across (seed, b) pairs (seed + b would collide)."""
    return int(np.random.SeedSequence([int(seed), int(b)]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------- generation
def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _generate_batch(model, tokenizer, prompt_ids, pad, gen_kwargs, stop_strings, seed) -> list[list[int]]:
    """Raw completion tokens (prompt-major, G rows per prompt, pads included) of one micro-batch."""
    device = _model_device(model)
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)  # [B, W] left-padded
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        att[i, width - len(p):] = 1
    extra = {}
    if stop_strings:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(
            [_StopStringCriterion(tokenizer, stop_strings, width, gen_kwargs["eos_token_id"])])
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                             **gen_kwargs, **extra)
    seqs = out.sequences if hasattr(out, "sequences") else out  # [B·G, W + n_new]
    return seqs[:, width:].cpu().tolist()


def _contains(text: str, stop_strings: tuple[str, ...]) -> bool:
    return any(s in text for s in stop_strings)


def _first_stop_string(tokens: list[int], stop_strings, tokenizer) -> int | None:
    """Smallest t with ``decode(tokens[:t+1])`` containing a stop string, or None.

    Binary search: containment in the decoded prefix only grows with the prefix.
    """
    dec = lambda n: tokenizer.decode(tokens[:n], skip_special_tokens=False)  # noqa: E731
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


def _trim(tokens: list[int], eos: tuple[int, ...], stop_strings, tokenizer) -> tuple[list[int], StopReason]:
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


class _StopStringCriterion:
    """Ends a row once its decoded completion holds a stop string (speed only; ``_trim`` decides).

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
        comp = input_ids[:, self.prompt_width:].tolist()  # [B·G, n_new]
        if self.done is None:
            self.done = torch.zeros(len(comp), dtype=torch.bool)
        for r, tokens in enumerate(comp):
            if self.done[r] or (tokens and tokens[-1] in self.eos):
                continue
            tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=False)
            if _contains(tail, self.stop_strings) and _contains(
                    self.tokenizer.decode(tokens, skip_special_tokens=False), self.stop_strings):
                self.done[r] = True
        return self.done.to(input_ids.device)
