"""Model loading (offline) and tokenizer compatibility; SmolLM2 end-to-end checks are slow."""

from __future__ import annotations

import pytest
import torch

from isdelta.engine import EngineConfig, LogProbEngine, Rollouts, builtin_models, check_compatible, load_model


def word_tokenizer(words, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", eos] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token=eos)


def test_check_compatible_accepts_identical_and_names_differences():
    check_compatible(word_tokenizer(["a", "b"]), word_tokenizer(["a", "b"]))
    with pytest.raises(ValueError, match="vocab size 5 vs 6"):
        check_compatible(word_tokenizer(["a", "b"]), word_tokenizer(["a", "b", "c"]))
    with pytest.raises(ValueError, match="token->id maps differ"):
        check_compatible(word_tokenizer(["a", "b"]), word_tokenizer(["b", "a"]))


def test_check_compatible_catches_special_ids():
    a, b = word_tokenizer(["a", "b"]), word_tokenizer(["a", "b"])
    b.eos_token = "a"
    with pytest.raises(ValueError, match="eos_token_id"):
        check_compatible(a, b)


def test_load_model_errors_are_clear(tmp_path):
    assert "smollm2-135m-instruct" in builtin_models()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(OSError, match="allow_download"):
        load_model("nobody-has/this-model-xyz")
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m-instruct", dtype="float8")


@pytest.mark.slow
def test_smollm2_loads_offline_and_scores_a_sampled_chat_completion(smollm2, monkeypatch):
    model, tok = smollm2
    assert tok.pad_token_id == tok.eos_token_id  # the case masks must survive
    assert tok.padding_side == "left" and model.config.vocab_size == 49152
    check_compatible(tok, tok)
    chats = [
        [{"role": "user", "content": "What is 2 + 3? Answer briefly."}],
        [{"role": "user", "content": "Name a colour."}],
    ]
    enc = tok.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    cfg = EngineConfig(temperature=0.8, top_p=0.95, progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=24,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **cfg.transform.generate_kwargs(),
        )
    P = enc["input_ids"].shape[1]
    comp = out[:, P:]
    # a mask from positions: real tokens up to and including the first EOS (pad == eos here)
    from isdelta.engine import completion_mask

    ro = Rollouts.from_tensors(
        enc["input_ids"],
        enc["attention_mask"],
        comp,
        completion_mask(comp, tok.eos_token_id),
        eos_token_ids=tok.eos_token_id,
        vocab_size=len(tok),
    )
    s = LogProbEngine(cfg).score(model, ro)
    assert torch.isfinite(s.logp).all() and (s.length > 0).all()
    for r in range(2):
        if ro.stopped[r]:  # the real EOS is counted even though pad == eos
            last = int(s.length[r]) - 1
            assert comp[r, last] == tok.eos_token_id and s.mask[r, last]
            assert s.token_logp[r, last] <= 0 and s.stop_logp[r] == s.token_logp[r, last]


@pytest.mark.slow
def test_smollm2_pad_equal_eos_keeps_the_real_eos(smollm2):
    model, tok = smollm2
    eos = tok.eos_token_id
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    comps = [
        tok(" Paris.", add_special_tokens=False)["input_ids"] + [eos],
        tok(" a city", add_special_tokens=False)["input_ids"],
    ]
    ro = Rollouts.from_token_lists([prompt], comps, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
    assert ro.lengths.tolist() == [len(comps[0]), len(comps[1])]
    s = LogProbEngine(progress=False).score(model, ro)
    assert s.stopped.tolist() == [True, False]
    assert s.mask.sum(-1).tolist() == [len(comps[0]), len(comps[1])]
    # and the per-token entropies of a real model are in a sane range (nats, ln V = 10.8)
    ent = s.token_entropy[s.mask]
    assert (ent >= 0).all() and (ent < 10.9).all()


@pytest.mark.slow
def test_gguf_model_is_plain_trainable_and_round_trips_bit_for_bit(smollm2, tmp_path):
    """transformers keeps its GGUF quantiser on de-quantised weights; load_model drops it, so HF's
    Trainer accepts the model and save_pretrained -> load_model(folder) gives the same tensors."""
    from transformers.trainer_utils import validate_quantization_for_training

    model, tok = smollm2
    assert not model.is_quantized and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(model)  # what Trainer.__init__ runs: raises on a quantised model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    check_compatible(tok, tok2)
