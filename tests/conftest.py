"""Shared fixtures: seeded rng and tiny random models built once per test run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# isdelta's cache (model identities) in a folder of the test run, for this process and the CLIs it
# starts: the tests never write into the user's ~/.cache
os.environ.setdefault("ISDELTA_CACHE_DIR", tempfile.mkdtemp(prefix="isdelta-test-cache-"))
# ... except the de-quantised builtin models (gemma-3-270m: minutes to build), which live in a
# git-ignored folder of the checkout and are kept between runs: a second `make test` reuses them
os.environ.setdefault("ISDELTA_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "models"))

# the tiny Llama of tiny_llama and checkpoint: 2 layers, V = 96 (the char tokenizer's), pad = eos
TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def one_layer_llama(vocab_size: int, max_position_embeddings: int = 64):
    """A 1-layer Llama (hidden 16) of any vocabulary, random weights, eval mode: vocabulary-size
    tests (V = 49152, 262144) where the body's cost must not matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """The engine's calls of the compiled chunk statistics (their logits' shapes), a list that grows."""
    import isdelta.engine.fused as fused_mod
    import isdelta.engine.logprob as logprob_mod

    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return fused_mod.chunk_stats(*args)

    monkeypatch.setattr(logprob_mod, "chunk_stats", spy)
    return calls


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261123)


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads cost more than they save (10× on a shared 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer RoPE model (Llama architecture), V = 96, random weights, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA)
    model = LlamaForCausalLM(cfg).eval()
    # Sharpen the head so distributions are far from uniform (entropy differences are visible).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A 2-layer absolute-position model (GPT-2 architecture), V = 96, random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        # Large position embeddings: a wrong position visibly changes every score.
        model.transformer.wpe.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (slow: ~20 s to load). Only for tests marked slow."""
    from isdelta.engine import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M, the base model (slow: de-quantised once into .cache/models, 1–2 min on 2 cores,
    then ~7 s to load). Only for tests marked slow."""
    from isdelta.engine import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def char_tok():
    """A char-level tokenizer with V = 96 ids matching tiny_llama: 0 unk, 1 bos, 2 eos = pad."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in map(chr, range(32, 127)) if c not in "`~|"] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) == 96
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one id per char
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>"
    )
    t.chat_template = (
        "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    return t


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, char_tok):
    """A 2-layer Qwen2 with random weights (seed 0) and the char tokenizer, saved as a local
    checkpoint (TRL's trainers take a path)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


@pytest.fixture
def checkpoint(tmp_path, char_tok):
    """A fresh tiny Llama (head sharpened ×8) saved as an HF folder (safetensors) with the char
    tokenizer: what ``model.path`` of a run config points at in the CLI tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path / "p0"
    model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


def json_numbers(obj, skip: tuple[str, ...] = (), prefix: str = ""):
    """``(path, float)`` for every number of a JSON tree (keys in ``skip`` left out): for comparing
    two reports number by number."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in skip:
                yield from json_numbers(v, skip, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_numbers(v, skip, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, float(obj)
