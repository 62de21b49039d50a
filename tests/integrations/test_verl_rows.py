"""The framework-free half of the verl adapter (``isdelta.integrations.verl_rows``): verl's
per-token arrays in, the monitor's result out, with the library's own numbers.

The arrays come from isdelta's engine on a tiny model (p0 its own samples, p1 one SGD step
away), laid out as verl lays them out: [N, R] response columns, right-padded, the stop token
counted, a ``uid`` per prompt. verl itself is tested in ``tests/with_verl`` (``make test-verl``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine, sample
from isdelta.estimators import estimate, estimate_tokens, headline
from isdelta.integrations.verl_rows import VerlMonitor, rows_from_arrays
from isdelta.training import MonitorError, MonitorWarning

ENGINE = EngineConfig(progress=False)


@pytest.fixture(scope="module")
def arrays(tiny_llama, char_tok):
    """verl-shaped arrays of 4 prompts × 6 samples under p0 and under a p1 one small step away."""
    model0 = tiny_llama
    s = sample(model0, char_tok, ["ab", "cd", "ef", "gh"], num_samples=6, transform=LogitTransform(),
               max_new_tokens=10, seed=0, progress=False)  # fmt: skip
    model1 = copy.deepcopy(model0)
    with torch.no_grad():
        model1.lm_head.weight.mul_(1.01)
    eng = LogProbEngine(ENGINE)
    sc0, sc1 = eng.score(model0, s.rollouts), eng.score(model1, s.rollouts)
    return {
        "lp0": sc0.token_logp.double().numpy(),
        "h0": sc0.token_entropy.double().numpy(),
        "lp1": sc1.token_logp.double().numpy(),
        "h1": sc1.token_entropy.double().numpy(),
        "mask": sc0.mask.numpy().astype(np.int64),
        "uid": [f"p{g}" for g in s.rollouts.group.tolist()],
        "responses": s.rollouts.completion_ids.numpy(),
        "V": model0.config.vocab_size,
    }


def monitor_result(a, **kw):
    mon = VerlMonitor(support_size=a["V"], eos_token_ids=[2], **kw.pop("options", {}))
    mon.before(a["lp0"], a["h0"], a["mask"], a["uid"], responses=a["responses"], **kw)
    return mon, mon.after(a["lp1"], a["h1"], step=7)


def library(a, logq=None):
    m = a["mask"].astype(bool)
    group = np.unique(a["uid"], return_inverse=True)[1]
    lp0, lp1, h0, h1 = (np.where(m, a[k], 0.0) for k in ("lp0", "lp1", "h0", "h1"))
    lq = None if logq is None else np.where(m, logq, 0.0)
    est = estimate(
        lp0.sum(1),
        lp1.sum(1),
        m.sum(1),
        group,
        entropy_sum0=h0.sum(1),
        entropy_sum1=h1.sum(1),
        log_q=None if lq is None else lq.sum(1),
    )
    toks = [estimate_tokens(lp0, lp1, h0, h1, m, group, method=k, token_logq=lq) for k in ("cv", "pd", "pd_sn")]
    return headline(est, *toks, support_size=a["V"])


def test_the_logged_numbers_are_the_librarys_on_the_same_arrays(arrays):
    _, res = monitor_result(arrays)
    want = library(arrays)
    assert want.valid and res.valid and res.step == 7 and res.n_rows == 24
    s = res.scalars()
    assert s["entropy/delta"] == want.delta.value and s["entropy/delta_se"] == want.delta.se
    assert s["entropy/delta_tok"] == want.delta_tok.value and s["entropy/delta_tok_ci_high"] == want.delta_tok.ci_high
    assert s["entropy/method"] == float(want.code) and s["entropy/h0_tok"] == want.h0_tok.value
    assert s["entropy/delta"] != 0.0


def test_p1_equal_to_p0_gives_zero(arrays):
    same = {**arrays, "lp1": arrays["lp0"], "h1": arrays["h0"]}
    _, res = monitor_result(same)
    s = res.scalars()
    assert res.valid and s["entropy/delta"] == 0.0 and s["entropy/delta_tok"] == 0.0
    assert s["entropy/delta_ci_low"] == 0.0 == s["entropy/delta_ci_high"]


def test_rollout_log_probs_are_the_proposal(arrays):
    rng = np.random.default_rng(0)
    logq = np.minimum(arrays["lp0"] + rng.normal(0, 0.01, arrays["lp0"].shape), 0.0)
    _, res = monitor_result(arrays, rollout_log_probs=logq)
    want = library(arrays, logq)
    assert res.scalars()["entropy/delta_tok"] == want.delta_tok.value
    assert res.estimate.proposal is not None and 0.9 < res.estimate.proposal.ess_frac <= 1.0
    assert any(w.startswith("sampler gap |log q − log p0| per token: mean 0.00") for w in res.warnings)


def test_stopped_rows_are_read_from_the_responses(arrays):
    rows = rows_from_arrays(
        arrays["lp0"],
        arrays["h0"],
        arrays["lp1"],
        arrays["h1"],
        arrays["mask"],
        arrays["uid"],
        responses=arrays["responses"],
        eos_token_ids=[2],
    )
    last = arrays["responses"][np.arange(24), arrays["mask"].sum(1) - 1]
    assert (rows["stopped"] == (last == 2)).all() and rows["length"].tolist() == arrays["mask"].sum(1).tolist()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a["mask"].__setitem__((0, 0), 0), r"response_mask: rows \[0\] are not one run .*tool rollouts"),
        (lambda a: a["lp1"].__setitem__((1, 0), np.nan), r"token_logp1: non-finite values on counted tokens"),
        (lambda a: a["lp0"].__setitem__((2, 0), 0.5), r"token_logp0: expected log-probabilities \(≤ 0\); got 0.5"),
        (lambda a: a["h1"].__setitem__((3, 0), -1.0), r"token_entropy1: expected entropies \(≥ 0\); got -1"),
        (lambda a: a.__setitem__("uid", a["uid"][:-1]), r"uid: expected one prompt id per row \(24\); got 23"),
        (lambda a: a.__setitem__("lp1", a["lp1"][:, :-1]), r"token_logp1: expected per-token values \[24, \d+\]"),
    ],
)
def test_bad_arrays_give_an_invalid_step_with_the_reason(arrays, change, match):
    bad = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v)
           for k, v in arrays.items()}  # fmt: skip
    change(bad)
    with pytest.warns(MonitorWarning, match=match):
        _, res = monitor_result(bad)
    assert not res.valid and not res.valid_tok and math.isnan(res.scalars()["entropy/delta_tok"])
    with pytest.raises((ValueError, MonitorError), match=match):
        monitor_result(bad, options={"strict": True})


def test_every_k_steps_and_a_missing_p0(arrays):
    mon = VerlMonitor(every=2)
    assert mon.due()
    with pytest.warns(MonitorWarning, match="no p0 arrays were kept"):
        first = mon.after(arrays["lp1"], arrays["h1"])  # before() never ran
    assert not first.valid and mon.n_steps == 1 and not mon.due()
    mon.before(arrays["lp0"], arrays["h0"], arrays["mask"], arrays["uid"])  # not due: nothing kept
    assert not mon.pending and mon.after(arrays["lp1"], arrays["h1"]) is None and mon.n_steps == 2
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lr'\]"):
        VerlMonitor(lr=1e-3)


def test_a_bad_option_raises_when_the_trainer_is_built_not_at_a_step():
    """``+isdelta.<option>`` is checked by the mixin's ``__init__``, before training starts."""
    from isdelta.integrations.verl import EntropyDeltaMixin

    class Base:  # stands for verl's trainer: the mixin only needs its config
        def __init__(self, config):
            self.config = config

    class Trainer(EntropyDeltaMixin, Base):
        pass

    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lr'\]"):
        Trainer({"isdelta": {"lr": 1e-3}})
    with pytest.raises(ValueError, match=r"every: expected a positive integer"):
        Trainer({"isdelta": {"every": 0}})
    assert Trainer({"isdelta": {"every": 3}})._isdelta_opts() == {"every": 3}
