"""audit_batch on constructed batches: each bug the field ships, built on purpose, must be named with
its rows; a correct batch and TRL's own GRPO batch pass clean. References: the masking table
(isdelta.engine.completion_mask / position_ids) and a naive per-row forward (unpadded rows, full
logits, log_softmax, gather, as tests/engine/test_logprob.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from isdelta.engine import completion_mask, position_ids
from isdelta.engine.audit import (
    AuditOptions,
    BatchAuditError,
    Kind,
    assert_batch_ok,
    audit_batch,
    batch_arguments,
    check_batch,
    load_batch,
)
from isdelta.engine.audit_checks import build_reference
from isdelta.engine.audit_cli import main
from isdelta.engine.audit_logps import row_references
from isdelta.engine.transform import LogitTransform

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads cost more than they save

EOS = PAD = 2  # pad == eos, as the tiny models and the char tokenizer have it
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17]]  # ragged: rows 0-3 have left pads
# G = 2 per prompt; rows 0, 1, 3, 4 stop (EOS = 2), rows 2 and 5 are cut at max_new_tokens = 5
COMPS = [[20, 21, 2], [30, 2], [40, 41, 42, 43, 44], [22, 23, 24, 2], [50, 2], [60, 61, 62, 63, 64]]
STOPPED = (0, 1, 3, 4)


def trl_batch(prompts=PROMPTS, comps=COMPS, pad=PAD, eos=EOS):
    """TRL's layout: left-padded prompts, right-padded completions, the reference mask; and the lengths."""
    G, N = len(comps) // len(prompts), len(comps)
    P, C = max(map(len, prompts)), max(map(len, comps))
    b = {
        "prompt_ids": torch.full((N, P), pad),
        "prompt_mask": torch.zeros(N, P, dtype=torch.long),
        "completion_ids": torch.full((N, C), pad),
    }
    for r, c in enumerate(comps):
        p = prompts[r // G]
        b["prompt_ids"][r, P - len(p) :] = torch.tensor(p)
        b["prompt_mask"][r, P - len(p) :] = 1
        b["completion_ids"][r, : len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in comps])
    b["completion_mask"] = completion_mask(b["completion_ids"], eos, lengths).long()
    return b, lengths


def attention(b) -> torch.Tensor:
    return torch.cat([b["prompt_mask"], b["completion_mask"]], 1)  # [N, P + C]


def naive_logps(model, b, temperature: float = 1.0) -> torch.Tensor:
    """Per-row reference [N, C]: the unpadded row, one forward, log_softmax(logits / T), gather."""
    N, C = b["completion_ids"].shape
    out = torch.zeros(N, C)
    for r in range(N):
        p = b["prompt_ids"][r][b["prompt_mask"][r].bool()]
        c = b["completion_ids"][r, : int(b["completion_mask"][r].sum())]
        with torch.no_grad():
            logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1 : -1].float()  # [L, V]
        out[r, : len(c)] = torch.log_softmax(logits / temperature, -1).gather(-1, c[:, None])[:, 0]
    return out


def padded_logits(model, b) -> torch.Tensor:
    """Logits [N, P + C, V] of the padded batch with the right positions."""
    ids, att = torch.cat([b["prompt_ids"], b["completion_ids"]], 1), attention(b)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=att, position_ids=position_ids(att)).logits.float()


def gathered(logits, ids) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]  # [N, C]


# ---------------------------------------------------------------------------------------------- clean batches
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_a_correct_batch_has_no_finding(arch, request, char_tok):
    model = request.getfixturevalue(arch)
    b, lengths = trl_batch()
    m = b["completion_mask"].float()
    full = dict(position_ids=position_ids(attention(b)), per_token_logps=naive_logps(model, b), model=model)
    report = audit_batch(**b, tokenizer=char_tok, loss_weights=m / m.sum(), **full)
    assert report.ok, str(report)
    assert report.checked == (
        "completion mask",
        "prompt padding",
        "positions",
        "log-prob values",
        "log-prob alignment (model)",
        "loss normalisation",
    )
    assert "no findings" in str(report)
    assert audit_batch(**b, tokenizer=char_tok, completion_lengths=lengths, **full).ok


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_the_audits_reference_is_the_naive_per_row_reference(arch, request):
    model = request.getfixturevalue(arch)
    b, _ = trl_batch()
    ref, _ = build_reference(**b, eos=(EOS,), pad=PAD, include_eos=True)
    for t in (1.0, 0.7):
        ours = row_references(model, ref, LogitTransform(temperature=t))["aligned"]
        m = b["completion_mask"].bool()
        torch.testing.assert_close(ours[m], naive_logps(model, b, t)[m], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- masks
def test_eos_dropped_when_the_mask_is_built_from_pad_id_and_pad_equals_eos(char_tok):
    """TRL PR #4970 / TRL #6357: mask = (completion_ids != pad_id) with pad == eos."""
    b, _ = trl_batch()
    b["completion_mask"] = (b["completion_ids"] != char_tok.pad_token_id).long()
    report = audit_batch(**b, tokenizer=char_tok)
    assert report.kinds == (Kind.EOS_DROPPED,)
    f = report.get(Kind.EOS_DROPPED)
    assert f.rows == STOPPED and f.cols == (1, 2, 3)  # each stopped row's EOS column


def test_a_convention_that_excludes_eos_is_audited_as_such():
    b, lengths = trl_batch(pad=0)
    b["completion_mask"] = completion_mask(b["completion_ids"], EOS, lengths, include_eos=False).long()
    assert audit_batch(**b, eos_token_ids=EOS, pad_token_id=0, options=AuditOptions(include_eos=False)).ok
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=0)  # pad != eos: not a pad-identity bug
    assert report.kinds == (Kind.STOP_NOT_COUNTED,) and report.findings[0].rows == STOPPED
    b, _ = trl_batch(pad=0)
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=0, options=AuditOptions(include_eos=False))
    assert report.kinds == (Kind.STOP_COUNTED,) and report.findings[0].rows == STOPPED


@pytest.mark.parametrize("source", ["pad_token_id", "completion_lengths", "attention_mask"])
def test_pads_counted_after_a_completion_without_a_stop(source):
    """verl #3805: 'up to the first EOS, else every column' counts the pads of a completion that
    never stopped and is shorter than the batch (cut by a stop string); pad (0) != eos (2)."""
    comps = [*COMPS[:5], [60, 61, 62]]  # row 5: no stop, 3 real tokens, then 2 pads
    b, lengths = trl_batch(comps=comps, pad=0)
    ids, C = b["completion_ids"], b["completion_ids"].shape[1]
    is_eos = ids == EOS
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full((len(ids),), C))
    b["completion_mask"] = (torch.arange(C)[None] <= first[:, None]).long()  # the verl-style mask
    extra = {
        "pad_token_id": {"pad_token_id": 0},
        "completion_lengths": {"completion_lengths": lengths},
        "attention_mask": {"attention_mask": torch.cat([b["prompt_mask"], completion_mask(ids, EOS, lengths)], 1)},
    }[source]
    report = audit_batch(**b, eos_token_ids=EOS, **extra)
    assert report.kinds == (Kind.PADS_NO_STOP,)
    assert report.findings[0].rows == (5,) and report.findings[0].cols == (3, 4)
    # with no real lengths and no pad id the pads look sampled: not detectable, and the report says so
    report = audit_batch(**b, eos_token_ids=EOS)
    assert report.ok and any("pads after completions without a stop token: not checked" in n for n in report.notes)


def test_tokens_counted_after_the_first_stop():
    """Two stop ids (Qwen's <|im_end|> and <|endoftext|>, here 9 and 2): a sampler that knew only 2
    went on after 9, and a mask of all sampled tokens counts past the first stop."""
    comps = [[20, 9, 21, 2], *COMPS[1:]]
    b, lengths = trl_batch(comps=comps, pad=0)
    b["completion_mask"] = (torch.arange(5)[None] < lengths[:, None]).long()  # every sampled token
    report = audit_batch(**b, eos_token_ids=(2, 9), completion_lengths=lengths)
    assert report.kinds == (Kind.AFTER_STOP,)
    assert report.findings[0].rows == (0,) and report.findings[0].cols == (2, 3)
    # pad == eos and a mask of ones: the pads after each stop are counted
    b, _ = trl_batch()
    b["completion_mask"] = torch.ones_like(b["completion_mask"])
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert report.kinds == (Kind.AFTER_STOP,) and report.findings[0].rows == STOPPED


def test_a_stop_id_missing_from_eos_token_ids_is_hinted():
    """The trainer stops counting at id 9 (a stop id it knows); the audit told only of 2 sees sampled
    tokens left out, and points at the id where the mask ends."""
    comps = [[20, 9, 21, 22], *COMPS[1:]]
    b, lengths = trl_batch(comps=comps, pad=0)
    b["completion_mask"] = completion_mask(b["completion_ids"], (2, 9), lengths).long()
    report = audit_batch(**b, eos_token_ids=EOS, completion_lengths=lengths)
    assert report.kinds == (Kind.NOT_COUNTED,) and report.findings[0].rows == (0,)
    assert (
        "ends at column 1 (token id 9): if id 9 stops generation, add it to eos_token_ids" in report.findings[0].detail
    )
    assert audit_batch(**b, eos_token_ids=(2, 9), completion_lengths=lengths).ok


def test_rows_masked_out_entirely_are_named():
    """TRL's mask_truncated_completions zeroes the rows cut at max_completion_length."""
    b, _ = trl_batch()
    b["completion_mask"][[2, 5]] = 0
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert report.kinds == (Kind.ROW_MASKED,) and report.findings[0].rows == (2, 5)
    assert "2 of them without a stop token" in report.findings[0].detail


def test_a_stop_string_cut_with_pad_equal_eos_needs_the_real_lengths():
    """The limit of the tensors alone: a completion cut by a stop string and padded with pad == eos
    looks like one that stopped. Inferred lengths call it an EOS drop (and the notes say they were
    inferred); the real lengths clear it."""
    comps = [*COMPS[:5], [60, 61, 62]]
    b, lengths = trl_batch(comps=comps)
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert report.kinds == (Kind.EOS_DROPPED,) and report.findings[0].rows == (5,)
    assert any("inferred" in n for n in report.notes)
    assert audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD, completion_lengths=lengths).ok


def test_right_padded_and_empty_prompts():
    b, _ = trl_batch()
    for r in range(len(b["prompt_ids"])):  # move each prompt's pads to its end
        n = int(b["prompt_mask"][r].sum())
        b["prompt_ids"][r] = torch.roll(b["prompt_ids"][r], n)
        b["prompt_mask"][r] = torch.roll(b["prompt_mask"][r], n)
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert report.kinds == (Kind.RIGHT_PADDED_PROMPT,)
    f = report.findings[0]
    assert f.rows == (0, 1, 2, 3) and f.block == "prompt" and f.cols == (2, 3, 4, 5, 6, 7)
    b, _ = trl_batch()
    b["prompt_mask"][5] = 0  # nothing scores row 5's first completion token
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert report.kinds == (Kind.EMPTY_PROMPT,) and report.findings[0].rows == (5,)


# ---------------------------------------------------------------------------------------------- positions
def test_left_padding_without_position_ids_costs_nats_on_gpt2_not_on_llama(tiny_gpt2, tiny_llama):
    """TRL #6800 / OpenRLHF #217: the forward passes no position_ids, so a left-padded row starts at
    its number of pads. The nats reported equal |S(padded, no positions) - S(naive)| per row."""
    b, _ = trl_batch()
    ids, att = torch.cat([b["prompt_ids"], b["completion_ids"]], 1), attention(b)
    measured = {}
    for name, model in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD, position_ids="implicit", model=model)
        assert report.kinds == (Kind.POSITIONS,)
        f = report.findings[0]
        assert f.rows == (0, 1, 2, 3) and f.block == "input"  # rows 4 and 5 have no left pads
        assert "5 too large, its number of left pads" in f.detail  # row 0: a 3-token prompt in P = 8
        with torch.no_grad():  # the trainer's forward, without position_ids
            logits = model(input_ids=ids, attention_mask=att).logits[:, 7:-1].float()
        m = b["completion_mask"].bool()
        S_trainer = torch.where(m, gathered(logits, b["completion_ids"]), 0).double().sum(-1)
        S_naive = torch.where(m, naive_logps(model, b), 0).double().sum(-1)
        assert f.nats == pytest.approx(float((S_trainer - S_naive).abs().max()), abs=1e-4)
        measured[name] = f.nats
    assert measured["gpt2"] > 0.1  # absolute positions: 0.39 nats here (random weights, V = 96)
    assert measured["llama"] < 1e-4  # RoPE: a shift common to the row, rounding only (~1e-6)
    # an explicit arange is the same bug; the right positions pass
    arange = torch.arange(ids.shape[1])[None].expand_as(ids)
    assert audit_batch(**b, eos_token_ids=EOS, position_ids=arange).kinds == (Kind.POSITIONS,)
    assert audit_batch(**b, eos_token_ids=EOS, position_ids=position_ids(att)).ok


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_log_probs_from_the_wrong_logits_column(arch, request):
    model = request.getfixturevalue(arch)
    b, _ = trl_batch()
    P, C = b["prompt_ids"].shape[1], b["completion_ids"].shape[1]
    logits = padded_logits(model, b)
    right = gathered(logits[:, P - 1 : -1], b["completion_ids"])  # the padded forward, DESIGN §2
    assert audit_batch(**b, eos_token_ids=EOS, per_token_logps=right, model=model).ok
    for wrong in (
        gathered(logits[:, -C:], b["completion_ids"]),  # logits[:, -C:] for logits[:, -C-1:-1]
        torch.roll(right, -1, dims=1),  # the right scores stored one column early
    ):
        report = audit_batch(**b, eos_token_ids=EOS, per_token_logps=wrong, model=model)
        assert report.kinds == (Kind.LOGP_SHIFTED,)
        f = report.findings[0]
        assert f.rows == tuple(range(6)) and f.nats > 0.1
    report = audit_batch(
        **b, eos_token_ids=EOS, per_token_logps=right, model=model, options=AuditOptions(temperature=0.7)
    )
    assert report.kinds == (Kind.LOGP_MISMATCH,)  # scored at T = 1, sampled at T = 0.7


def test_logits_alone_reveal_the_wrong_column(tiny_llama):
    """Without a model: logits one column late fit the next sampled token by nats per token."""
    torch.manual_seed(3)
    pi = torch.tensor([[2, 2, 5, 6, 7], [8, 9, 10, 11, 12], [2, 2, 2, 13, 14], [2, 2, 2, 2, 15]])
    pm = (torch.arange(5)[None] >= torch.tensor([[2], [0], [3], [4]])).long()
    with torch.no_grad():
        out = tiny_llama.generate(
            input_ids=pi, attention_mask=pm, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=2, eos_token_id=2
        )
    b = {"prompt_ids": pi, "prompt_mask": pm, "completion_ids": out[:, 5:]}
    b["completion_mask"] = completion_mask(b["completion_ids"], EOS).long()
    logits = padded_logits(tiny_llama, b)
    assert audit_batch(**b, eos_token_ids=EOS, logits=logits[:, 4:-1]).ok
    for late_or_early in (logits[:, 5:], logits[:, 3:-2]):
        report = audit_batch(**b, eos_token_ids=EOS, logits=late_or_early)
        assert report.kinds == (Kind.LOGP_SHIFTED,) and "inferred from the logits alone" in report.findings[0].detail


def test_values_that_are_not_log_probs():
    b, _ = trl_batch()
    report = audit_batch(**b, eos_token_ids=EOS, per_token_logps=torch.full((6, 5), 3.0))  # logits, say
    assert report.kinds == (Kind.LOGP_INVALID,) and report.findings[0].rows == tuple(range(6))


# ---------------------------------------------------------------------------------------------- loss weights
def test_loss_normalised_per_sequence_instead_of_per_token():
    b, lengths = trl_batch()
    m = b["completion_mask"].float()
    L = m.sum(-1, keepdim=True)  # [N, 1]: 3, 2, 5, 4, 2, 5
    report = audit_batch(**b, eos_token_ids=EOS, loss_weights=m / (L * len(m)))  # GRPO's per-sequence mean
    assert report.kinds == (Kind.PER_SEQUENCE,)
    assert report.findings[0].rows == tuple(range(6))  # no row has the mean length 3.5
    assert "down-weighted" in report.findings[0].detail
    assert audit_batch(**b, eos_token_ids=EOS, loss_weights=m / m.sum()).ok  # per token (DESIGN §7)
    assert audit_batch(**b, eos_token_ids=EOS, loss_weights=m / (len(m) * 5)).ok  # Dr. GRPO's constant
    adv = torch.arange(6.0)[:, None] + 1  # advantages folded in: neither pattern
    assert audit_batch(**b, eos_token_ids=EOS, loss_weights=adv * m).kinds == (Kind.WEIGHTS_OTHER,)


# ---------------------------------------------------------------------------------------------- report, errors, CLI
def test_the_report_reads_as_a_table_and_fails_a_test():
    b, _ = trl_batch()
    b["completion_mask"] = (b["completion_ids"] != PAD).long()
    report = audit_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    text = str(report)
    assert "1 finding" in text and Kind.EOS_DROPPED in text and "0-1, 3-4" in text and "fix:" in text
    with pytest.raises(BatchAuditError, match="EOS dropped") as e:
        report.raise_if_any()
    assert isinstance(e.value, AssertionError)
    assert json.loads(json.dumps(report.to_dict()))["findings"][0]["rows"] == list(STOPPED)
    with pytest.raises(AssertionError, match="pad == eos"):
        assert_batch_ok(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert assert_batch_ok(**trl_batch()[0], eos_token_ids=EOS).ok


def test_bad_input_says_what_was_expected():
    b, _ = trl_batch()
    with pytest.raises(ValueError, match="one N"):
        audit_batch(**{**b, "completion_ids": b["completion_ids"][:3]}, eos_token_ids=EOS)
    with pytest.raises(ValueError, match="integer token ids"):
        audit_batch(**{**b, "prompt_ids": b["prompt_ids"].float()}, eos_token_ids=EOS)
    with pytest.raises(ValueError, match="loss_weights="):
        audit_batch(**{**b, "completion_mask": b["completion_mask"] * 0.5}, eos_token_ids=EOS)
    with pytest.raises(ValueError, match="no stop ids"):
        audit_batch(**b)
    with pytest.raises(ValueError, match="'implicit'"):
        audit_batch(**b, eos_token_ids=EOS, position_ids="none")
    with pytest.raises(ValueError, match="lacks"):
        batch_arguments({"prompt_ids": b["prompt_ids"]})


def test_negative_token_ids_are_refused_with_the_rows():
    """-100 (a loss-ignore label) or -1 as a pad id: not token ids, wherever they sit (the forward embeds pads)."""
    b, _ = trl_batch()
    for name, r, c, value in (("prompt_ids", 0, 0, -1), ("completion_ids", 2, 4, -100)):
        bad = {**b, name: b[name].clone()}
        bad[name][r, c] = value
        with pytest.raises(ValueError, match=rf"{name}: rows {r} hold negative token ids \(e.g. {value}\)"):
            audit_batch(**bad, eos_token_ids=EOS, pad_token_id=PAD)
        with pytest.raises(ValueError, match=rf"{name}: rows {r} hold negative"):
            check_batch(**bad, eos_token_ids=EOS)


def test_all_zero_loss_weights_are_named():
    """mask // mask.sum() (an integer division) weighs every token 0: the loss trains on nothing."""
    b, _ = trl_batch()
    m = b["completion_mask"]
    report = audit_batch(**b, eos_token_ids=EOS, loss_weights=m // m.sum())
    assert report.kinds == (Kind.WEIGHTS_ZERO,) and report.findings[0].rows == tuple(range(6))
    assert "trains on nothing" in report.findings[0].detail
    assert audit_batch(**b, eos_token_ids=EOS, loss_weights=m / m.sum()).ok


def test_a_stop_id_outside_the_vocabulary_is_a_bad_id_not_a_mask_finding(tiny_llama, char_tok):
    """eos id 500 with V = 96: no token can be it. Blaming the mask ("pads counted", "tokens after the stop")
    would send the user to the wrong tensor."""
    b, _ = trl_batch()
    with pytest.raises(ValueError, match=r"eos_token_ids: id 500 is outside the model's vocabulary \(ids 0-95\)"):
        audit_batch(**b, eos_token_ids=500, pad_token_id=PAD, model=tiny_llama)
    with pytest.raises(ValueError, match=r"eos_token_ids: id 96 is outside the tokenizer's vocabulary"):
        audit_batch(**b, eos_token_ids=(EOS, 96), tokenizer=char_tok)
    with pytest.raises(ValueError, match=r"pad_token_id: id 200 is outside the model's vocabulary"):
        audit_batch(**b, eos_token_ids=EOS, pad_token_id=200, model=tiny_llama)
    with pytest.raises(ValueError, match=r"eos_token_ids: id 96 is outside"):
        check_batch(**b, eos_token_ids=96, vocab_size=96)
    assert audit_batch(**b, eos_token_ids=EOS, model=tiny_llama).ok  # the ids the model knows


class NotATensor:
    """A class pickled into a .pt file: weights_only=True refuses to rebuild it."""


@pytest.mark.parametrize("kind", ["garbage", "truncated", "custom object"])
def test_an_unloadable_pt_file_says_what_it_is_not_without_torchs_unsafe_advice(tmp_path, capsys, kind):
    b, _ = trl_batch()
    path = tmp_path / "batch.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file\n")
    elif kind == "truncated":
        torch.save(b, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({**b, "extra": NotATensor()}, path)
    with pytest.raises(ValueError) as info:
        load_batch(path)
    msg = str(info.value)
    assert "is not a torch file of plain tensors loadable with weights_only=True" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's message is not chained
    for advice in ("weights_only=False", "weights_only` set to `False", "trust the source", "Re-running"):
        assert advice not in msg
    assert main([str(path), "--eos-id", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "weights_only=False" not in err and "False" not in err


# ---------------------------------------------------------------------------------------------- check_batch
def test_check_batch_corrects_only_an_uncounted_first_stop_it_is_sure_of():
    """The one unambiguous fix: the first stop token left out by a mask built from token != pad_id (pad == eos),
    given that no row counts its stop; a batch where some rows do (a stop-string cut?) is not corrected."""
    good, lengths = trl_batch()
    bad = {**good, "completion_mask": (good["completion_ids"] != PAD).long()}
    check = check_batch(**bad, eos_token_ids=EOS, pad_token_id=PAD)
    assert check.report.kinds == (Kind.EOS_DROPPED,) and check.input_findings == check.report.findings
    assert torch.equal(check.mask, good["completion_mask"].bool())  # the reference mask, EOS counted
    assert "rows 0-1, 3-4" in check.correction and "pad == eos" in check.correction
    assert "Pass completion_lengths to be exact" in check.correction  # inferred lengths: the assumption is named
    # a row that stops at once has an all-zero mask under the same bug: still only its stop token missing
    comps = [[2], *COMPS[1:]]
    good0, _ = trl_batch(comps=comps)
    bad0 = {**good0, "completion_mask": (good0["completion_ids"] != PAD).long()}
    check = check_batch(**bad0, eos_token_ids=EOS, pad_token_id=PAD)
    assert Kind.ROW_MASKED in check.report.kinds and torch.equal(check.mask, good0["completion_mask"].bool())
    # exact lengths: sure, and the note does not need the assumption
    check = check_batch(**bad, eos_token_ids=EOS, pad_token_id=PAD, completion_lengths=lengths)
    assert torch.equal(check.mask, good["completion_mask"].bool()) and "Assumed" not in check.correction
    # pad (0) != eos: a mask that stops before the stop token; the trailing pads say the stop was sampled
    good_p0, _ = trl_batch(pad=0)
    excl = {**good_p0, "completion_mask": completion_mask(good_p0["completion_ids"], EOS, lengths, False).long()}
    check = check_batch(**excl, eos_token_ids=EOS, pad_token_id=0)
    assert check.report.kinds == (Kind.STOP_NOT_COUNTED,) and torch.equal(check.mask, good_p0["completion_mask"].bool())


def test_check_batch_leaves_ambiguous_and_other_findings_uncorrected():
    # a row cut by a stop string (pad == eos) next to rows that count their EOS: a pad or a dropped EOS?
    comps = [*COMPS[:5], [60, 61, 62]]
    b, lengths = trl_batch(comps=comps)
    check = check_batch(**b, eos_token_ids=EOS, pad_token_id=PAD)
    assert check.report.kinds == (Kind.EOS_DROPPED,) and check.mask is None and check.correction is None
    assert check_batch(**b, eos_token_ids=EOS, pad_token_id=PAD, completion_lengths=lengths).report.ok
    # the EOS dropped, but also a right-padded prompt: refused as a whole
    bad, _ = trl_batch()
    bad["completion_mask"] = (bad["completion_ids"] != PAD).long()
    bad["prompt_mask"][0] = torch.roll(bad["prompt_mask"][0], 3)
    check = check_batch(**bad, eos_token_ids=EOS, pad_token_id=PAD)
    assert Kind.RIGHT_PADDED_PROMPT in check.report.kinds and check.mask is None
    # tokens counted after the stop, real tokens left out: not a missing stop token
    for mask in (torch.ones_like(b["completion_mask"]), torch.zeros_like(b["completion_mask"])):
        good, _ = trl_batch()
        assert check_batch(**{**good, "completion_mask": mask}, eos_token_ids=EOS, pad_token_id=PAD).mask is None
    # log-prob findings are not input findings
    good, _ = trl_batch()
    check = check_batch(**good, eos_token_ids=EOS, per_token_logps=torch.full((6, 5), 3.0))
    assert check.report.kinds == (Kind.LOGP_INVALID,) and check.input_findings == () and check.mask is None


def test_cli_audits_a_saved_batch(tmp_path, capsys, checkpoint):
    from safetensors.torch import save_file

    from isdelta.engine import load_model

    b, _ = trl_batch()
    save_file(b, tmp_path / "clean.safetensors")
    assert main([str(tmp_path / "clean.safetensors"), "--eos-id", "2", "--pad-id", "2"]) == 0
    bad = {**b, "response_mask": (b["completion_ids"] != PAD).long()}
    del bad["completion_mask"]
    torch.save(bad, tmp_path / "bad.pt")
    assert (
        main([str(tmp_path / "bad.pt"), "--eos-id", "2", "--pad-id", "2", "--key", "completion_mask=response_mask"])
        == 1
    )
    assert Kind.EOS_DROPPED in capsys.readouterr().out
    assert main([str(tmp_path / "bad.pt"), "--eos-id", "2"]) == 2  # completion_mask missing
    assert capsys.readouterr().err.startswith("error: the batch lacks ['completion_mask']")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main([str(tmp_path / "junk.pt"), "--eos-id", "2"]) == 2
    assert "error:" in capsys.readouterr().err
    # --model: TRL's key for the log-probs, the wrong column; eos and pad from the model's tokenizer
    model, _ = load_model(checkpoint)
    C = b["completion_ids"].shape[1]
    torch.save(
        {**b, "old_per_token_logps": gathered(padded_logits(model, b)[:, -C:], b["completion_ids"])},
        tmp_path / "shifted.pt",
    )
    capsys.readouterr()
    assert main([str(tmp_path / "shifted.pt"), "--model", str(checkpoint), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in out["findings"]] == [Kind.LOGP_SHIFTED] and out["findings"][0]["nats"] > 0


# ---------------------------------------------------------------------------------------------- TRL
PROMPT_TEXTS = ["1=", "1+=", "1+1=", "11+1=", "11+11=", "111+11=", "111+111=", "1111+111="]  # all lengths differ


def length_reward(completions, **kwargs) -> list[float]:
    return [len(c) / 8 for c in completions]


def test_trl_grpo_batch_passes_clean(tmp_path, char_tok, tiny_qwen2_dir):
    """TRL's own GRPOTrainer batch (its _prepare_inputs output) passes, its old_per_token_logps checked
    on the model that made them (one generation serves two steps, so TRL computes them)."""
    pytest.importorskip("trl", reason="needs the trl extra: pip install -e '.[trl]'")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            num_generations=4,
            gradient_accumulation_steps=1,
            steps_per_generation=2,
            max_completion_length=8,
            max_steps=1,
            temperature=0.9,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=str(tiny_qwen2_dir),
            reward_funcs=length_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPT_TEXTS}),
        )
    original, reports = trainer._prepare_inputs, []

    def audited(generation_batch):
        inputs = original(generation_batch)
        common = dict(eos_token_ids=trainer.eos_token_ids, tokenizer=char_tok, model=trainer.model)
        opts = AuditOptions(temperature=args.temperature, logp_tol=1e-5)  # fp32: TRL's own numbers, to rounding
        assert "old_per_token_logps" in inputs and inputs["prompt_mask"].sum(-1).unique().numel() > 1  # left pads
        reports.append(audit_batch(**batch_arguments(inputs), **common, options=opts))
        # TRL's forward passes no position_ids: named, and on this RoPE model it costs rounding only
        reports.append(audit_batch(**batch_arguments(inputs), **common, options=opts, position_ids="implicit"))
        return inputs

    trainer._prepare_inputs = audited
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    clean, implicit = reports[:2]
    assert clean.ok, str(clean)
    assert "log-prob alignment (model)" in clean.checked
    positions = implicit.get(Kind.POSITIONS)
    assert implicit.kinds == (Kind.POSITIONS,) and positions.nats < 1e-4
