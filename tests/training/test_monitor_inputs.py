"""What the monitor is handed, checked by the batch audit's own checks: a mask that drops the EOS (pad == eos,
``ids != pad_id``) is corrected to the reference mask and gives the ΔH of the correct mask; any other finding
refuses the step; ``old_logp`` from the wrong logits column is set aside; bad arguments to ``before``,
``after`` and the constructor are named. References: the monitor on the correct mask (same rows, same
arithmetic), and the batch audit."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch

from isdelta.engine import Rollouts
from isdelta.training import EntropyMonitor, MonitorWarning
from isdelta.training import verdict as verdict_module
from tests.training.test_monitor import ENGINE, naive_token_logp, perturb, random_rollouts, sampled_rollouts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads cost more than they save

PAD = EOS = 2  # the tiny models' pad and eos


@pytest.fixture(scope="module")
def stopping_llama(tiny_llama):
    """tiny_llama with an LM head whose bias favours EOS (id 2): its samples stop within a few tokens, as a
    trained model's do (the random model stops with probability ~1/96 per token, so no EOS would be dropped)."""
    model = copy.deepcopy(tiny_llama)
    head = torch.nn.Linear(32, 96, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = 6.0
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def samples(stopping_llama):
    """On-policy rows: 4 prompts × 8 samples, cut at 12 tokens; every one stops with EOS = pad."""
    import numpy as np

    ro = sampled_rollouts(stopping_llama, np.random.default_rng(4), P=4, G=8, max_new=12)
    assert int(ro.stopped.sum()) >= 24
    return ro


def tensors(ro: Rollouts, mask=None) -> dict:
    """A trainer's dict for these rows: the correct mask, or ``mask``."""
    P = ro.prompt_len
    return {
        "prompt_ids": ro.prompt_ids,
        "prompt_mask": ro.attention_mask[:, :P],
        "completion_ids": ro.completion_ids,
        "completion_mask": ro.completion_mask.long() if mask is None else mask,
    }


def measure(model, batch, scale=0.001, **options):
    """(result, snapshot) of one monitored step on a copy of ``model``: the same perturbation every call."""
    model = copy.deepcopy(model)
    mon = EntropyMonitor(model, engine_config=ENGINE, **options)
    snap = mon.before(batch)
    perturb(model, scale=scale)
    return mon.after(snap), snap


# ---------------------------------------------------------------------------- the EOS dropped: corrected
def test_a_mask_that_drops_the_eos_is_corrected_to_the_delta_of_the_correct_mask(stopping_llama, samples):
    """pad == eos and mask = ids != pad_id: every stopped row loses its EOS and reads as truncated. Before the
    input checks this step was valid (cv) with ΔH −0.039 ± 0.089 nats against −0.235 ± 0.109 on the correct
    mask, 6× too small and outside its own 95% interval; now the mask is corrected (the real length is known
    from the first stop), the ΔH is the correct mask's bit for bit, and the result says so."""
    good = tensors(samples)
    bad = tensors(samples, (samples.completion_ids != PAD).long())
    assert not torch.equal(good["completion_mask"], bad["completion_mask"])
    ref, _ = measure(stopping_llama, good)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, snap = measure(stopping_llama, bad)
    assert ref.valid and res.valid and res.method == ref.method
    assert res.delta.value == ref.delta.value and res.delta.se == ref.delta.se  # the same rows: bit for bit
    assert res.delta_snis.value == ref.delta_snis.value
    assert torch.equal(snap.rollouts.completion_mask, samples.completion_mask)
    note = next(w for w in res.warnings if w.startswith("completion_mask: the first stop token of rows"))
    assert "pad == eos" in note and "Pass completion_lengths to be exact" in note
    assert [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)] == [
        next(str(w.message) for w in caught if "completion_mask" in str(w.message))
    ]
    # exact lengths: the same correction, without the assumption
    with pytest.warns(MonitorWarning, match="real lengths given"):
        res, _ = measure(stopping_llama, {**bad, "completion_lengths": samples.completion_lengths})
    assert res.delta.value == ref.delta.value and not any("Assumed" in w for w in res.warnings)


def test_the_correction_is_warned_once_and_noted_every_step(stopping_llama, samples):
    bad = tensors(samples, (samples.completion_ids != PAD).long())
    mon = EntropyMonitor(copy.deepcopy(stopping_llama), engine_config=ENGINE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [mon.after(mon.before(bad)) for _ in range(2)]
    assert sum(issubclass(w.category, MonitorWarning) for w in caught) == 1
    assert all(r.valid and any(w.startswith("completion_mask:") for w in r.warnings) for r in results)


def test_strict_raises_where_it_would_correct(stopping_llama, samples):
    bad = tensors(samples, (samples.completion_ids != PAD).long())
    mon = EntropyMonitor(copy.deepcopy(stopping_llama), engine_config=ENGINE, strict=True)
    with pytest.raises(ValueError, match=r"EOS dropped \(pad == eos\).*strict=True: otherwise the monitor would"):
        mon.before(bad)


# ---------------------------------------------------------------------------- other findings: refused
def refused(model, batch, match: str, **options):
    """The step is invalid with a reason that matches; strict raises it."""
    with pytest.warns(MonitorWarning, match=match):
        res, snap = measure(model, batch, **options)
    assert not res.valid and res.estimate is None and snap.rollouts is None
    assert math.isnan(res.scalars()["entropy/delta"]) and res.scalars()["entropy/valid"] == 0.0
    with pytest.raises((ValueError, TypeError), match=match):
        EntropyMonitor(copy.deepcopy(model), engine_config=ENGINE, strict=True, **options).before(batch)
    return res


def test_findings_without_a_sure_correction_refuse_the_step(stopping_llama, samples):
    good = tensors(samples)
    # one stopped row's EOS left out, the others counted: a pad or a dropped EOS? only the lengths can say
    mixed = good["completion_mask"].clone()
    r = int((samples.stopped & (samples.lengths > 1)).nonzero()[0])
    mixed[r, int(samples.lengths[r]) - 1] = 0
    res = refused(stopping_llama, {**good, "completion_mask": mixed}, r"completion_mask: .*EOS dropped \(pad == eos\)")
    assert f"rows {r})" in res.reason and "not measured" in res.reason
    # with the lengths that say the EOS was sampled, it is corrected
    lengths = samples.completion_lengths
    with pytest.warns(MonitorWarning, match=rf"the first stop token of rows {r} was not counted"):
        fixed, _ = measure(stopping_llama, {**good, "completion_mask": mixed, "completion_lengths": lengths})
    assert fixed.valid
    # a mask of ones: pads after the stop are counted
    ones = torch.ones_like(good["completion_mask"])
    refused(
        stopping_llama, {**good, "completion_mask": ones}, r"completion_mask: .*tokens counted after the first stop"
    )
    # a right-padded prompt: the first completion token is scored by a pad's logits
    pm, ids = good["prompt_mask"].clone(), good["prompt_ids"].clone()
    short = (pm.sum(-1) < pm.shape[1]).nonzero().flatten()
    assert len(short)
    for row in short.tolist():
        n = int(pm[row].sum())
        pm[row], ids[row] = torch.roll(pm[row], n), torch.roll(ids[row], n)
    refused(stopping_llama, {**good, "prompt_ids": ids, "prompt_mask": pm}, r"prompt_mask: .*right-padded prompt")


def test_negative_ids_and_ids_outside_the_vocabulary_are_refused(tiny_llama, samples):
    good = tensors(samples)
    ids = good["completion_ids"].clone()
    ids[3, -1] = -100
    refused(tiny_llama, {**good, "completion_ids": ids}, r"completion_ids: rows 3 hold negative token ids")
    ids[3, -1] = 96
    refused(tiny_llama, {**good, "completion_ids": ids}, r"token ids up to 96 but the model's vocabulary has 96")
    big = Rollouts.from_tensors(**{**good, "completion_ids": ids}, eos_token_ids=EOS)  # a Rollouts is checked too
    refused(tiny_llama, big, r"token ids up to 96")
    refused(tiny_llama, {**good, "eos_token_ids": [2, 300]}, r"eos_token_ids: id 300 is outside the model's vocab")


def test_a_rollouts_is_checked_with_its_own_real_lengths(tiny_llama, rng):
    """Rows cut by a stop string next to rows that stopped (pad == eos): the dict needs the lengths (else it is
    refused as ambiguous); a Rollouts carries them (its attention mask) and is measured as it is."""
    ro = random_rollouts(rng)
    res, snap = measure(tiny_llama, ro, group_by="given")
    assert res.valid and snap.rollouts is ro and not snap.notes
    refused(tiny_llama, {**tensors(ro), "group": ro.group}, r"EOS dropped", group_by="given")


# ---------------------------------------------------------------------------- old_logp from the wrong column
def test_old_logp_from_the_wrong_column_is_set_aside_and_p0_rescored(tiny_llama, rng):
    ro = sampled_rollouts(tiny_llama, rng)
    right = naive_token_logp(tiny_llama, ro)
    shifted = torch.roll(right, -1, dims=1)  # the right scores stored one column early
    model = copy.deepcopy(tiny_llama)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    with pytest.warns(MonitorWarning, match=r"old_logp is not reused from now on.*log-probs shifted by one column"):
        snap = mon.before(ro, old_logp=shifted)
    assert not snap.reused_old_logp and snap.entropy_sum0 is not None  # p0 rescored (RB estimates)
    perturb(model, scale=0.001)  # measure's step
    res = mon.after(snap)
    ref, _ = measure(tiny_llama, ro)  # no old_logp at all
    assert res.valid and res.delta.value == ref.delta.value
    assert any(w.startswith("old_logp not reused (p0 rescored): log-probs shifted") for w in res.warnings)
    # and from then on, even right log-probs are not reused (the trainer is the same)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # noted, not warned again
        assert not mon.before(ro, old_logp=right).reused_old_logp
    # the right log-probs, on a fresh monitor: checked once against the model, then reused
    fresh = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE)
    assert fresh.before(ro, old_logp=right).reused_old_logp


# ---------------------------------------------------------------------------- bad arguments
def test_bad_arguments_to_after_are_named_and_give_an_invalid_step(tiny_llama, rng):
    ro = random_rollouts(rng)
    mon = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE)
    snap = mon.before(ro)
    cases = [
        (None, r"snapshots: expected the Snapshot that before\(\) returned.*got None"),
        ({"prompt_ids": ro.prompt_ids}, r"snapshots: .*got a dict with keys \['prompt_ids'\] \(a batch\?"),
        (ro, r"snapshots: .*got a Rollouts \(a batch\?"),
        ([snap, None], r"snapshots\[1\]: expected a Snapshot .*got None"),
        ("snap", r"snapshots: .*got a str"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (arg, match) in enumerate(cases):
            res = mon.after(arg)
            assert not res.valid and res.step == k and mon.n_steps == k + 1, arg  # the step is counted
            assert res.reason is not None and re.search(match, res.reason), res.reason
    assert sum(issubclass(w.category, MonitorWarning) for w in caught) == 2  # "snapshots", "snapshots[1]"
    strict = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE, strict=True)
    for arg, match in cases:
        with pytest.raises(TypeError, match=match):
            strict.after(arg)


def test_bad_tensors_given_to_before_are_named(tiny_llama, rng):
    ro = random_rollouts(rng)
    good = {**tensors(ro), "completion_lengths": ro.completion_lengths}
    N, C = ro.completion_ids.shape
    cases = [
        ({**good, "prompt_ids": good["prompt_ids"][0]}, r"prompt_ids must have 2 dimensions; got shape"),
        ({**good, "completion_ids": good["completion_ids"].float()}, r"completion_ids must hold integer token ids"),
        ({**good, "completion_mask": good["completion_mask"] * 0.5}, r"completion_mask must hold only 0 and 1"),
        ({**good, "prompt_mask": good["prompt_mask"][:, 1:]}, r"expected prompt_ids and prompt_mask \[N, P\]"),
        ({**good, "completion_mask": None}, r"completion_mask must be a tensor or an array; got NoneType"),
        ({**good, "completion_lengths": torch.zeros(N + 1, dtype=torch.long)}, r"completion_lengths must be \[N\]"),
        ({**good, "completion_lengths": ro.completion_lengths.float()}, r"completion_lengths must hold integers"),
        ({**good, "eos_token_ids": "2"}, r"batch\['eos_token_ids'\]: expected an int or a non-empty sequence"),
        ([good], r"batch: expected an isdelta Rollouts or a mapping"),
    ]
    for batch, match in cases:
        refused(tiny_llama, batch, match)
    for old, match in (("x", r"old_logp: expected a tensor or array"), (torch.zeros(N, C - 1), r"old_logp: expected")):
        mon = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE)
        with pytest.warns(MonitorWarning, match=match):
            assert not mon.after(mon.before(ro, old_logp=old)).valid
        with pytest.raises((TypeError, ValueError), match=match):
            EntropyMonitor(tiny_llama, engine_config=ENGINE, strict=True).before(ro, old_logp=old)


def test_what_the_constructor_can_see_raises_there(tiny_llama):
    with pytest.raises(ValueError, match=r"eos_token_ids: id 500 is outside the model's vocabulary \(ids 0-95\)"):
        EntropyMonitor(tiny_llama, eos_token_ids=500)
    with pytest.raises(ValueError, match=r"pad_token_id: id 96 is outside the model's vocabulary"):
        EntropyMonitor(tiny_llama, pad_token_id=96)
    with pytest.raises(TypeError, match=r"eos_token_ids: expected an int or a non-empty sequence of ints.*'2'"):
        EntropyMonitor(tiny_llama, eos_token_ids="2")
    with pytest.raises(TypeError, match=r"eos_token_ids: .*got \[\]"):
        EntropyMonitor(tiny_llama, eos_token_ids=[])
    with pytest.raises(ValueError, match=r"pad_token_id: token ids are non-negative; got -1"):
        EntropyMonitor(tiny_llama, pad_token_id=-1)
    with pytest.raises(TypeError, match=r"strict: expected True or False; got 'yes'"):
        EntropyMonitor(tiny_llama, strict="yes")
    mon = EntropyMonitor(tiny_llama, eos_token_ids=torch.tensor([2, 5]))
    assert mon.eos_token_ids == (2, 5) and mon.pad_token_id == PAD  # pad from the model's config


def test_a_failing_headline_policy_gives_an_invalid_step(tiny_llama, rng, monkeypatch):
    """Fault injection: whatever raises after the forwards stays out of the training loop."""
    ro = random_rollouts(rng)

    def broken(*args, **kwargs):
        raise NameError("name '_bounds' is not defined (simulated)")

    monkeypatch.setattr(verdict_module, "headline", broken)  # judge_rows calls it
    mon = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE)
    with pytest.warns(MonitorWarning, match="the headline policy failed: NameError"):
        res = mon.after(mon.before(ro))
    assert not res.valid and "simulated" in res.reason
    strict = EntropyMonitor(copy.deepcopy(tiny_llama), engine_config=ENGINE, strict=True)
    with pytest.raises(NameError, match="simulated"):
        strict.after(strict.before(ro))
