"""Drawing G completions per prompt from p0 (DESIGN.md §2–§3).

HF ``generate`` samples from whatever its ``generation_config`` says, and a checkpoint's config
often says more than we want (``top_k=50`` as a global default, ``repetition_penalty=1.05`` in
Qwen's). Every such processor changes the sampling distribution without changing how the engine
scores it, which biases every importance weight. So :func:`sample` passes the transform's
temperature / top-k / top-p explicitly and forces every other logit processor to neutral.

Stop strings are applied after generation, on the tokens (:mod:`isdelta.engine.stops`).

``backend="vllm"`` samples the same prompts with the same transform and stop rules through vLLM
(:mod:`isdelta.engine.vllm_sampling`), returning the sampler's log q of each token beside them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Integral
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from isdelta.engine.masking import normalise_eos_ids
from isdelta.engine.models import context_size
from isdelta.engine.samples import Samples, prompt_seed
from isdelta.engine.stops import StopStringCriterion, check_stop_strings, trim
from isdelta.engine.transform import LogitTransform, is_integer

__all__ = [
    "MAX_NUM_SAMPLES",
    "SEED_MAX",
    "Samples",
    "check_context",
    "check_sample_options",
    "encode_prompts",
    "prompt_seed",
    "sample",
]

# G is drawn for one prompt in one batch of G rows (HF: one generate call; vLLM: one request's n):
# vLLM refuses n above VLLM_MAX_N_SEQUENCES (16384 by default), and one decoding step of 16384 rows
# holds 16384 × V float32 logits (3.2 GB at SmolLM2's V = 49152) before any other buffer.
MAX_NUM_SAMPLES = 16384
# seeds go to numpy's SeedSequence (non-negative integers only) and torch.manual_seed (64-bit)
SEED_MAX = 2**63 - 1

Prompt = str | Sequence[dict] | Sequence[int]  # text, chat messages, or token ids as they are

# generate() arguments that make its sampling distribution exactly the LogitTransform's: each
# turns off a logit processor that a checkpoint's generation_config may switch on. Keys this
# transformers version does not know are dropped (they would reach the model's forward).
_NEUTRAL = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "guidance_scale": None,
    "sequence_bias": None,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "prompt_lookup_num_tokens": None,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}


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
    backend: Literal["hf", "vllm"] = "hf",
) -> Samples:
    """Draw ``num_samples`` completions per prompt from ``model`` under ``transform``.

    Parameters
    ----------
    model : HF causal LM, or VLLMModel with ``backend="vllm"``
        An HF model is sampled in eval mode (dropout off); its mode is restored afterwards. A
        :class:`isdelta.engine.vllm_sampling.VLLMModel` (``load_vllm``) holds a vLLM engine.
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
        HF: micro-batch b is seeded with ``SeedSequence([seed, b])``; the caller's RNG state is
        restored afterwards. Samples are reproducible for the same seed, prompt batching,
        device and library versions. vLLM: prompt i's request is seeded with
        ``SeedSequence([seed, i])``: the same seed, prompts and versions give the same tokens
        (their log q agree to rounding: vLLM's batch composition changes the logits' sums).
    eos_token_ids : int or sequence of int, optional
        Stop-token ids. Default: ``tokenizer.eos_token_id`` plus ``model.generation_config``'s.
    prompt_batch_size : int, optional
        Prompts per ``generate`` call; default: as many as fit ``token_budget``.
    token_budget : int
        Most tokens (rows × (prompt width + max_new_tokens)) in one ``generate`` call.
    progress : bool
        Show a progress bar over prompts.
    backend : {"hf", "vllm"}
        HF ``generate`` on ``model`` (the engine's own p0), or vLLM (a proposal q: the result's
        ``token_logq`` holds its processed log-prob of each sampled token).

    Returns
    -------
    Samples
        Prompt-major rows r = p·G + g.
    """
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm'; got {backend!r}.")
    _check_args(num_samples, max_new_tokens, transform, prompt_batch_size, token_budget)
    check_sample_options(seed=seed)
    stop_strings = check_stop_strings(stop_strings)
    eos = _default_eos_ids(model, tokenizer, eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompt_ids, prompt_texts = encode_prompts(tokenizer, prompts)
    check_context(model, [len(p) for p in prompt_ids], max_new_tokens)
    if backend == "vllm":
        from isdelta.engine.vllm_sampling import VLLMModel, sample_vllm

        if not isinstance(model, VLLMModel):
            raise TypeError(
                f"backend='vllm' samples a VLLMModel; got {type(model).__name__}. Build one with "
                "isdelta.engine.vllm_sampling.load_vllm(folder) (save_for_vllm writes the folder)."
            )
        return sample_vllm(
            model,
            tokenizer,
            prompt_ids,
            prompt_texts,
            num_samples=int(num_samples),
            transform=transform,
            max_new_tokens=int(max_new_tokens),
            stop_strings=stop_strings,
            seed=int(seed),
            eos=eos,
            pad=int(pad),
            progress=progress,
        )
    gen_kwargs = {
        **_neutral_kwargs(model),
        **transform.generate_kwargs(),
        "max_new_tokens": int(max_new_tokens),
        "num_return_sequences": int(num_samples),
        "pad_token_id": int(pad),
        "eos_token_id": list(eos),
    }
    batches = _prompt_batches(
        [len(p) for p in prompt_ids], num_samples, max_new_tokens, prompt_batch_size, token_budget
    )
    completions, reasons = [], []
    bar = tqdm(
        total=len(prompt_ids), desc="sampling", unit="prompt", leave=False, disable=True if not progress else None
    )
    was_training = model.training
    model.eval()  # dropout off: p0 is the model's deterministic distribution
    try:
        for b, idx in enumerate(batches):
            out = _generate_batch(
                model, tokenizer, [prompt_ids[i] for i in idx], int(pad), gen_kwargs, stop_strings, prompt_seed(seed, b)
            )
            for tokens in out:
                kept, reason = trim(tokens, eos, stop_strings, tokenizer)
                completions.append(kept)
                reasons.append(reason)
            bar.update(len(idx))
    finally:
        model.train(was_training)
        bar.close()
    return Samples.from_tokens(
        prompt_ids,
        completions,
        reasons,
        prompt_texts,
        tokenizer,
        eos=eos,
        pad=pad,
        transform=transform,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        stop_strings=stop_strings,
    )


# ---------------------------------------------------------------------------- arguments
def _check_args(num_samples, max_new_tokens, transform, prompt_batch_size, token_budget) -> None:
    """Raise ValueError/TypeError on bad scalar options."""
    if not isinstance(transform, LogitTransform):
        raise TypeError(
            f"transform must be an isdelta LogitTransform; got {type(transform).__name__}. "
            "Build one with LogitTransform(temperature=..., top_k=..., top_p=...)."
        )
    check_sample_options(num_samples=num_samples, max_new_tokens=max_new_tokens)
    for name, v in [("token_budget", token_budget)] + (
        [("prompt_batch_size", prompt_batch_size)] if prompt_batch_size is not None else []
    ):
        if not is_integer(v) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")


def check_sample_options(*, num_samples: int | None = None, max_new_tokens: int | None = None, seed=None) -> None:
    """ValueError unless each option given is in the range :func:`sample` can draw with.

    ``num_samples`` in [1, ``MAX_NUM_SAMPLES``]; ``max_new_tokens`` >= 1 (the model's context is
    checked against the prompts by :func:`check_context`); ``seed`` in [0, ``SEED_MAX``].
    """
    if num_samples is not None and (not is_integer(num_samples) or not 1 <= num_samples <= MAX_NUM_SAMPLES):
        raise ValueError(
            f"num_samples must be an integer in [1, {MAX_NUM_SAMPLES}]; got {num_samples!r}. The G samples of a "
            f"prompt are drawn as one batch of G rows: vLLM refuses more than {MAX_NUM_SAMPLES}, and at "
            f"{MAX_NUM_SAMPLES} rows one decoding step's float32 logits already take 3.2 GB at a 49152-token "
            "vocabulary. Draw more prompts instead (the estimators use every prompt's samples)."
        )
    if max_new_tokens is not None and (not is_integer(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    if seed is not None and (not is_integer(seed) or not 0 <= seed <= SEED_MAX):
        raise ValueError(
            f"seed must be an integer in [0, 2**63 - 1]; got {seed!r}. It seeds numpy's SeedSequence, which "
            "takes non-negative integers only, and torch.manual_seed, which takes 64-bit ones."
        )


def _default_eos_ids(model, tokenizer, eos_token_ids) -> tuple[int, ...]:
    """The stop ids: the given ones, else the tokenizer's EOS plus the generation_config's."""
    if eos_token_ids is None:
        gc = getattr(model, "generation_config", None)
        ids = [tokenizer.eos_token_id, getattr(gc, "eos_token_id", None)]
        flat = [i for x in ids if x is not None for i in ([x] if isinstance(x, int) else list(x))]
        eos_token_ids = flat
    eos = normalise_eos_ids(eos_token_ids)
    if not eos:
        raise ValueError(
            "no stop-token id: the tokenizer has no eos_token_id and the model's "
            "generation_config none either. Pass eos_token_ids=[...] explicitly."
        )
    return eos


def check_context(model, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Raise ValueError when a prompt plus ``max_new_tokens`` exceeds the model's context.

    Past ``max_position_embeddings`` an absolute-position model (GPT-2) fails inside ``generate``
    and a RoPE model runs on positions it was never trained on: neither measures the model.
    """
    n = context_size(model)
    if n is None:
        return
    over = [i for i, L in enumerate(prompt_lengths) if L + max_new_tokens > n]
    if over:
        i = over[0]
        raise ValueError(
            f"prompts {over[:5]}{' …' if len(over) > 5 else ''} do not fit the model's context of {n} "
            f"positions: prompt {i} has {prompt_lengths[i]} tokens + max_new_tokens {max_new_tokens}. "
            "Shorten those prompts or lower max_new_tokens."
        )


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt as :func:`sample` feeds them (chat prompts rendered by
    the chat template; a list of ints is taken as already tokenized, e.g. a trainer's prompt
    tokens); ValueError naming the prompt's index when one cannot be encoded."""
    if isinstance(prompts, (str, dict)) or len(prompts) == 0:
        got = f"{type(prompts).__name__}{'' if prompts else ' (empty)'}"
        raise ValueError(
            "prompts must be a non-empty list of str, of chat message lists or of token-id lists; got "
            f"{got}. Wrap a single prompt as [prompt]."
        )
    ids, texts = [], []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else p
        if isinstance(p, (list, tuple)) and p and all(isinstance(t, Integral) and is_integer(t) and t >= 0 for t in p):
            ids.append([int(t) for t in p])
            texts.append(tokenizer.decode(ids[-1], skip_special_tokens=False))
            continue
        if isinstance(p, str):
            text, special = p, True
        elif isinstance(p, Sequence) and all(isinstance(m, dict) and "role" in m for m in p):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(
                    f"prompt {i} is a chat (a list of messages) but the tokenizer has no "
                    "chat_template. Pass plain str prompts, or set tokenizer.chat_template."
                )
            text = tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            special = False  # the template already holds BOS and the role markers
        else:
            raise ValueError(
                f"prompt {i} must be a str, a list of {{'role', 'content'}} dicts or a list of token ids; "
                f"got {type(p).__name__}: {str(p)[:80]!r}."
            )
        tok = tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(tok) == 0:
            raise ValueError(
                f"prompt {i} tokenizes to no tokens ({text!r}); every prompt needs at "
                "least one token to condition the first completion token on."
            )
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
        if (
            cur is not None
            and cur != v
            and k not in ("output_scores", "return_dict_in_generate", "output_logits", "min_length")
        ):
            overridden.append(f"{k}={cur!r}")
    if overridden:
        warnings.warn(
            f"model.generation_config sets {', '.join(overridden)}; isdelta samples p0 from the "
            "LogitTransform alone (the engine scores only temperature/top-k/top-p), so these are "
            "overridden to neutral. To sample with them, they would have to be scored too.",
            stacklevel=3,
        )
    return kwargs


def _prompt_batches(
    n_tokens: list[int], G: int, max_new_tokens: int, prompt_batch_size: int | None, token_budget: int
) -> list[list[int]]:
    """Contiguous prompt-index batches: at most ``prompt_batch_size`` prompts, or within the budget."""
    batches, cur, width = [], [], 0
    for i, n in enumerate(n_tokens):
        w = max(width, n)
        full = (
            len(cur) >= prompt_batch_size
            if prompt_batch_size is not None
            else (len(cur) + 1) * G * (w + max_new_tokens) > token_budget
        )
        if cur and full:
            batches.append(cur)
            cur, w = [], n
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


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
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        att[i, width - len(p) :] = 1
    extra = {}
    if stop_strings:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(
            [StopStringCriterion(tokenizer, stop_strings, width, gen_kwargs["eos_token_id"])]
        )
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **gen_kwargs, **extra)
    seqs = out.sequences if hasattr(out, "sequences") else out  # [B·G, W + n_new]
    return seqs[:, width:].cpu().tolist()
