"""EntropyMonitor against the engine + estimate called by hand, old_logp reuse against rescoring,
the model's state around the monitor, and the failure policy."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from isdelta.engine import EngineConfig, LogProbEngine, Rollouts
from isdelta.estimators import estimate, estimate_tokens
from isdelta.training import EntropyMonitor, MonitorError, MonitorResult, MonitorWarning
from isdelta.training import verdict as verdict_module
from isdelta.training.rows import prompt_keys

ENGINE = EngineConfig(progress=False)


def random_rollouts(rng, P=4, G=6, V=96, max_prompt=5, max_comp=7) -> Rollouts:
    """Ragged prompts and completions, some stopping at EOS = pad = 2 before their end."""
    prompts = [rng.integers(3, V, size=rng.integers(1, max_prompt + 1)).tolist() for _ in range(P)]
    comps = []
    for _ in range(P * G):
        c = rng.integers(3, V, size=rng.integers(1, max_comp + 1)).tolist()
        if rng.random() < 0.5:
            c[rng.integers(0, len(c))] = 2
        comps.append(c)
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def sampled_rollouts(model, rng, P=4, G=6, max_new=7) -> Rollouts:
    """Samples of ``model`` itself (on-policy rows, as a trainer's are): G completions of each of
    P random prompts, cut at ``max_new`` tokens or at EOS = 2."""
    prompts = [rng.integers(3, 96, size=rng.integers(1, 6)).tolist() for _ in range(P)]
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    comps = []
    with torch.no_grad():
        for p in prompts:
            for _ in range(G):
                ids = torch.tensor([p])
                out = []
                for _ in range(max_new):
                    probs = model(ids).logits[0, -1].softmax(-1)
                    t = int(torch.multinomial(probs, 1, generator=gen))
                    out.append(t)
                    if t == 2:
                        break
                    ids = torch.cat([ids, torch.tensor([[t]])], 1)
                comps.append(out)
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def trainer_batch(ro: Rollouts) -> dict:
    """The tensors a GRPO trainer holds for these rows (TRL's names), with the real lengths: random_rollouts
    has rows that end without a stop before the last column (cut by a stop string), which pad == eos makes
    look like rows that stopped (only the lengths tell them apart)."""
    pl = ro.prompt_len
    return {
        "prompt_ids": ro.prompt_ids,
        "prompt_mask": ro.attention_mask[:, :pl],
        "completion_ids": ro.completion_ids,
        "completion_mask": ro.completion_mask.long(),
        "completion_lengths": ro.completion_lengths,
        "advantages": torch.zeros(ro.n_rows),
    }


def perturb(model, scale=0.0005, seed=0) -> None:
    """p0 → p1 in place, with its own generator (the global RNG is not touched). The default
    step is small enough for the headline policy to read it with cv at G = 6 (prefix ESS / G ≈ 0.98)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def by_hand(p0, p1, ro, tokens=False, **kw):
    """The reference: score both models with the engine, then call estimate (or, with
    ``tokens``, estimate_tokens with the per-decision control-variate method)."""
    eng = LogProbEngine(ENGINE)
    s0, s1 = eng.score(p0, ro), eng.score(p1, ro)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tokens:
            return estimate_tokens(
                s0.token_logp.numpy(),
                s1.token_logp.numpy(),
                s0.token_entropy.numpy(),
                s1.token_entropy.numpy(),
                s0.mask.numpy(),
                ro.group.numpy(),
                **kw,
            )
        return estimate(
            s0.logp.numpy(),
            s1.logp.numpy(),
            s0.length.numpy(),
            ro.group.numpy(),
            entropy_sum0=s0.entropy_sum.numpy(),
            entropy_sum1=s1.entropy_sum.numpy(),
            stopped=ro.stopped.numpy(),
            **kw,
        )


def naive_token_logp(model, ro) -> torch.Tensor:
    """log p0 [N, C] of the completion tokens from one full-logits forward in fp32, as a trainer
    computes it (TRL's selective_log_softmax on logits[:, prompt_len - 1:-1])."""
    att = ro.attention_mask
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=att, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, ro.prompt_len - 1 : -1], -1)  # [N, C, V]
    return logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)  # [N, C]


@pytest.fixture
def models(tiny_llama):
    """(p0, p1): a frozen copy of p0 for the reference, and the trained model the monitor holds."""
    return copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)


# ---------------------------------------------------------------------------- against by hand
@pytest.mark.parametrize("form", ["rollouts", "dict"])
def test_result_equals_engine_and_estimate_by_hand(models, rng, form):
    p0, model = models
    ro = random_rollouts(rng)
    mon = EntropyMonitor(model, engine_config=ENGINE, group_by="given", eos_token_ids=2)
    snap = mon.before(ro if form == "rollouts" else {**trainer_batch(ro), "group": ro.group})
    perturb(model)
    res = mon.after(snap)
    ref = by_hand(p0, model, ro)
    ref_pd = by_hand(p0, model, ro, tokens=True)
    assert res.valid and res.reason is None and res.rao_blackwell
    assert res.estimate.to_dict() == ref.to_dict()  # same rows, same arithmetic: bit for bit
    assert res.tokens.to_dict() == ref_pd.to_dict() and res.method == "cv"
    # the headline is per-decision; sequence-level SNIS (RB) is reported beside it
    assert res.delta == ref_pd.delta and res.delta_tok == ref_pd.delta_tok
    assert res.delta_snis == ref.delta_rb and res.delta_tok_snis == ref.delta_tok_rb
    s = res.scalars()
    assert s["entropy/delta"] == ref_pd.delta.value and s["entropy/delta1"] == ref.delta1.value
    ci = (s["entropy/delta_ci_low"], s["entropy/delta_ci_high"])
    assert ci == (ref_pd.delta.ci_low, ref_pd.delta.ci_high)
    assert s["entropy/delta_snis"] == ref.delta_rb.value and s["entropy/delta_snis_se"] == ref.delta_rb.se
    assert s["entropy/direct"] == ref_pd.direct.value and s["entropy/per_decision"] == 1.0
    assert s["entropy/valid"] == 1.0 and s["entropy/n_rows"] == ro.n_rows
    json.dumps(res.to_dict(), allow_nan=False)


def test_prompt_keyed_groups_give_the_same_estimate(models, rng):
    """group_by='prompt' (hash of the prompt tokens) partitions the rows as the prompts do."""
    p0, model = models
    ro = random_rollouts(rng)
    mon = EntropyMonitor(model, engine_config=ENGINE)  # eos from the model's config (2)
    snap = mon.before(trainer_batch(ro))
    perturb(model)
    res = mon.after(snap)
    ref = by_hand(p0, model, ro)
    assert len(np.unique(snap.rollouts.group)) == ro.n_prompts
    for name in ("delta_rb", "delta_tok_rb", "delta", "delta1"):
        a, b = getattr(res.estimate, name), getattr(ref, name)
        assert a.value == pytest.approx(b.value, rel=1e-12) and a.se == pytest.approx(b.se, rel=1e-10)


def test_micro_batches_of_one_step_merge(models, rng):
    """Snapshots of two micro-batches (splitting prompts) give the estimate on all rows; a prompt
    with one row in the step is left out."""
    p0, model = models
    ro = random_rollouts(rng, P=3, G=5)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    perm = torch.as_tensor(rng.permutation(ro.n_rows))
    snaps = [mon.before(ro.select(perm[:7])), mon.before(ro.select(perm[7:]))]
    perturb(model, scale=0.002)
    res = mon.after(snaps)
    ref = by_hand(p0, model, ro.select(perm))
    ref_pd = by_hand(p0, model, ro.select(perm), tokens=True, method=res.method)  # the headline's method
    assert res.valid and res.n_rows == ro.n_rows and res.n_dropped == 0
    assert res.delta_snis.value == pytest.approx(ref.delta_rb.value, abs=1e-6)
    assert res.delta.value == pytest.approx(ref_pd.delta.value, rel=1e-6)
    assert res.delta.se == pytest.approx(ref_pd.delta.se, rel=1e-6)

    lone = ro.select([0, 1, 2, 5])  # prompt 1 has one row here
    res = mon.after([mon.before(lone)])
    assert res.valid and res.n_dropped == 1 and res.n_rows == 3
    assert any("single row" in w for w in res.warnings)


# ---------------------------------------------------------------------------- old_logp
def test_old_logp_reuse_equals_rescoring(models, rng):
    """A trainer's fp32 log-probs reused for log p0 give the plain estimate of rescoring p0."""
    _, model = models
    ro = sampled_rollouts(model, rng)  # plain estimates (−S/L) need samples of p0 to be entropies
    old = naive_token_logp(model, ro)
    old[~ro.completion_mask] = float("nan")  # uncounted positions are never read
    reuse = EntropyMonitor(model, engine_config=ENGINE, group_by="given")
    rescore = EntropyMonitor(model, engine_config=ENGINE, group_by="given", rao_blackwell="never")
    always = EntropyMonitor(model, engine_config=ENGINE, group_by="given", rao_blackwell="always")
    snaps = [reuse.before(ro, old_logp=old), rescore.before(ro), always.before(ro, old_logp=old)]
    perturb(model)
    a, b, c = reuse.after(snaps[0]), rescore.after(snaps[1]), always.after(snaps[2])
    assert snaps[0].reused_old_logp and not a.rao_blackwell and not b.rao_blackwell
    for name in ("delta", "delta_tok", "delta1", "h0", "h1"):
        assert getattr(a.estimate, name).value == pytest.approx(getattr(b.estimate, name).value, abs=1e-5)
    assert a.delta.value == pytest.approx(b.delta.value, abs=1e-5)
    # "always": p0 is rescored (RB headline) and the gap to the trainer's log-probs is reported
    assert c.rao_blackwell and c.old_logp_gap < 1e-4 and not snaps[2].reused_old_logp
    assert c.estimate.delta.value == b.estimate.delta.value


def test_old_logp_shape_mismatch(models, rng):
    _, model = models
    ro = random_rollouts(rng)
    wrong = torch.zeros(ro.n_rows, ro.completion_ids.shape[1] - 1)
    strict = EntropyMonitor(model, engine_config=ENGINE, strict=True)
    with pytest.raises(ValueError, match=r"old_logp: expected per-token log-probs \[N, C\]"):
        strict.before(ro, old_logp=wrong)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    snap = mon.before(ro, old_logp=wrong)
    with pytest.warns(MonitorWarning, match="old_logp"):
        res = mon.after(snap)
    assert not res.valid and "old_logp" in res.reason and res.estimate is None
    assert math.isnan(res.scalars()["entropy/delta"]) and res.scalars()["entropy/valid"] == 0.0


# ---------------------------------------------------------------------------- model state
def test_model_mode_grads_flags_and_rng_are_restored(models, rng):
    _, model = models
    ro = random_rollouts(rng)
    model.train()
    model.model.layers[0].eval()  # a frozen tower left in eval mode inside a training model
    model.model.embed_tokens.weight.requires_grad_(False)
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask)
    out.logits.float().square().mean().backward()
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items() if g is not None}
    torch.manual_seed(123)
    cpu_rng = torch.get_rng_state()

    mon = EntropyMonitor(model, engine_config=ENGINE)
    with mon.step(ro) as s:
        assert {n: m.training for n, m in model.named_modules()} == modes
    assert s.result.valid

    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert p.grad is grads[n]
        if p.grad is not None:
            assert torch.equal(p.grad, values[n])


# ---------------------------------------------------------------------------- failure policy
def test_diverged_step_gives_invalid_result_or_raises_when_strict(models, rng):
    """A step that leaves NaN in the weights: the p1 forward fails, the training loop does not."""
    _, model = models
    ro = random_rollouts(rng)
    for strict in (False, True):
        mon = EntropyMonitor(model, engine_config=ENGINE, strict=strict)
        snap = mon.before(ro)
        saved = model.lm_head.weight[5, 0].item()
        with torch.no_grad():
            model.lm_head.weight[5, 0] = float("nan")
        try:
            if strict:
                with pytest.raises(FloatingPointError, match="non-finite logits"):
                    mon.after(snap)
            else:
                with pytest.warns(MonitorWarning, match="FloatingPointError"):
                    res = mon.after(snap)
                assert not res.valid and "non-finite logits" in res.reason
        finally:
            with torch.no_grad():
                model.lm_head.weight[5, 0] = saved


def test_failing_p1_score_is_invalid_warned_once_and_raises_when_strict(models, rng, monkeypatch):
    _, model = models
    ro = random_rollouts(rng)
    for strict in (False, True):
        mon = EntropyMonitor(model, engine_config=ENGINE, strict=strict)
        snaps = [mon.before(ro), None]

        def boom(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(mon._engine, "score", boom)
        if strict:
            with pytest.raises(RuntimeError, match="simulated"):
                mon.after(snaps[0])
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = mon.after(snaps[0])
            monkeypatch.undo()
            snaps[1] = mon.before(ro)
            monkeypatch.setattr(mon._engine, "score", boom)
            res2 = mon.after(snaps[1])
        assert not res.valid and not res2.valid and "simulated" in res.reason
        assert sum(issubclass(w.category, MonitorWarning) for w in caught) == 1


def test_khat_above_one_with_a_low_ess_is_invalid(models, rng, monkeypatch):
    _, model = models
    ro = random_rollouts(rng)
    real = verdict_module.estimate
    monkeypatch.setattr(
        verdict_module, "estimate", lambda *a, **k: dataclasses.replace(real(*a, **k), khat=1.3, ess_frac=0.3)
    )
    mon = EntropyMonitor(model, engine_config=ENGINE)
    snap = mon.before(ro)
    perturb(model)
    with pytest.warns(MonitorWarning, match="k̂ = 1.30 > 1"):
        res = mon.after(snap)
    s = res.scalars()
    assert not res.valid and res.estimate is not None  # kept for inspection
    assert math.isnan(s["entropy/delta"]) and s["entropy/khat"] == 1.3 and s["entropy/valid"] == 0.0
    strict = EntropyMonitor(model, engine_config=ENGINE, strict=True)
    with pytest.raises(MonitorError, match="k̂"):
        strict.after(strict.before(ro))


# ---------------------------------------------------------------------------- schedule, options
def test_every_and_context_manager(models, rng):
    _, model = models
    ro = random_rollouts(rng)
    mon = EntropyMonitor(model, engine_config=ENGINE, every=2)
    results = []
    for k in range(3):
        with mon.step(trainer_batch(ro)) as s:
            perturb(model, seed=k)
        results.append(s.result)
    assert [r is None for r in results] == [False, True, False]
    assert [r.step for r in results if r is not None] == [0, 2] and mon.n_steps == 3
    assert isinstance(results[0], MonitorResult) and results[0].valid
    with pytest.raises(ZeroDivisionError), mon.step(ro):  # a failing step is counted, not scored
        raise ZeroDivisionError
    assert mon.n_steps == 4


def test_scalar_keys_and_bad_options(models, rng):
    _, model = models
    ro = random_rollouts(rng)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    res = mon.after(mon.before(ro))  # p1 = p0: ΔH = 0 exactly
    assert res.delta.value == 0.0 and res.delta_tok.value == 0.0
    assert res.delta_snis.value == 0.0 and res.tokens.direct.value == 0.0
    keys = {
        "delta",
        "delta_se",
        "delta_ci_low",
        "delta_ci_high",
        "delta_tok",
        "delta_tok_se",  # issue 26: documented additions; the earlier keys are unchanged
        "delta_tok_ci_low",
        "delta_tok_ci_high",
        "h0",
        "h1",
        "h0_tok",
        "h1_tok",
        "method",
        "delta_snis",
        "delta_snis_se",
        "delta_snis_ci_low",
        "delta_snis_ci_high",
        "delta_tok_snis",
        "direct",
        "path_shift",
        "delta1",
        "kl",
        "ess_frac",
        "khat",
        "prefix_ess_frac",
        "valid",
        "valid_tok",
        "per_decision",
        "rao_blackwell",
        "n_rows",
        "seconds",
    }
    assert set(res.scalars()) == {f"entropy/{k}" for k in keys}
    assert all(isinstance(v, float) for v in res.scalars().values())
    with pytest.raises(ValueError, match="weights"):
        EntropyMonitor(model, weights="bogus")
    with pytest.raises(ValueError, match="every"):
        EntropyMonitor(model, every=0)
    with pytest.raises(ValueError, match="per_decision"):
        EntropyMonitor(model, per_decision="snis")
    with pytest.raises(ValueError, match="full-sequence ratio"):
        EntropyMonitor(model, engine_config=EngineConfig(include_eos=False))
    with pytest.raises(ValueError, match="missing keys"):
        EntropyMonitor(model, strict=True).before({"prompt_ids": ro.prompt_ids})


# ---------------------------------------------------------------------------- per decision
def test_per_decision_merges_micro_batches_of_different_widths(models, rng):
    """Micro-batches with different completion widths are padded (pads not counted) and give the
    per-decision estimate of all rows scored at once."""
    p0, model = models
    ro = random_rollouts(rng, P=3, G=4, max_comp=7)
    L = ro.completion_lengths
    short = (L <= 3).nonzero().flatten()
    long = (L > 3).nonzero().flatten()
    assert len(short) and len(long)
    # select trims nothing; rebuild the short rows so their block is narrower than the long rows'
    parts = []
    for rows in (short, long):
        sub = ro.select(rows)
        n = int(sub.completion_lengths.max())
        comps = [sub.completion_ids[i, : int(sub.completion_lengths[i])].tolist() for i in range(sub.n_rows)]
        prompts = [sub.prompt_ids[i, sub.prompt_len - int(sub.prompt_lengths[i]) :].tolist() for i in range(sub.n_rows)]
        part = Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)
        assert part.completion_ids.shape[1] == n
        parts.append(part)
    mon = EntropyMonitor(model, engine_config=ENGINE)
    snaps = [mon.before(p) for p in parts]
    perturb(model, scale=0.003)
    res = mon.after(snaps)
    both = Rollouts.concat(parts, pad_token_id=2)
    keyed = dataclasses.replace(both, group=prompt_keys(both.prompt_ids, both.prompt_lengths))  # group_by="prompt"
    ref_pd = by_hand(p0, model, keyed, tokens=True, method=res.method)  # the headline's method
    assert res.valid and res.tokens is not None and res.n_rows == ro.n_rows - res.n_dropped
    assert res.delta.value == pytest.approx(ref_pd.delta.value, rel=1e-6)
    assert res.delta_tok.value == pytest.approx(ref_pd.delta_tok.value, rel=1e-6)


def test_per_decision_off_and_without_p0_forward(models, rng):
    """per_decision="off", or old_logp reused (no p0 entropies), make SNIS the headline."""
    _, model = models
    ro = sampled_rollouts(model, rng)
    mon = EntropyMonitor(model, engine_config=ENGINE, per_decision="off")
    res = mon.after(mon.before(ro))
    assert res.tokens is None and res.method == "snis_rb" and res.delta == res.delta_snis
    assert math.isnan(res.scalars()["entropy/direct"]) and res.scalars()["entropy/per_decision"] == 0.0
    mon = EntropyMonitor(model, engine_config=ENGINE)
    res = mon.after(mon.before(ro, old_logp=naive_token_logp(model, ro)))
    assert res.tokens is None and res.method == "snis" and res.delta == res.estimate.delta
    mon = EntropyMonitor(model, engine_config=ENGINE, per_decision="pd_sn")
    res = mon.after(mon.before(ro))
    assert res.method == "pd_sn" and res.delta.value == 0.0  # p1 = p0
