"""A monitored step whose per-sequence ΔH cannot be read but whose per-token rate can (issue 26):
the logged scalars keep every earlier key, say which level is valid, and carry the per-token
headline only."""

from __future__ import annotations

import math

import pytest

from isdelta.estimators import checks
from isdelta.training import MonitorResult
from tests.estimators.test_long_completions import verdicts


@pytest.fixture()
def tok_only(monkeypatch):
    monkeypatch.setattr(checks, "TERMS_KHAT", 0.3)
    monkeypatch.setattr(checks, "TERMS_KHAT_TOK", math.inf)
    sets, _ = verdicts(alpha=0.3, eos0=0.0, C=128, n_sets=6)
    h, toks, res = next((h, t, r) for h, t, r in sets if h.valid_tok and not h.valid and h.method in ("cv", "pd"))
    tokens = next(t for t in toks if t.method == h.method)
    return MonitorResult(3, False, h.reason, res, True, res.n_rows, tokens=tokens, headline=h, valid_tok=True)


def test_only_the_per_token_figures_are_logged(tok_only):
    r = tok_only
    s = r.scalars()
    assert s["entropy/valid"] == 0.0 and s["entropy/valid_tok"] == 1.0
    assert s["entropy/delta_tok"] == r.headline.delta_tok.value and s["entropy/delta_tok_se"] == r.headline.delta_tok.se
    assert s["entropy/delta_tok_ci_low"] < s["entropy/delta_tok"] < s["entropy/delta_tok_ci_high"]
    for key in ("delta", "delta_se", "delta_ci_low", "h0", "h1", "delta_snis", "direct", "delta1"):
        assert math.isnan(s[f"entropy/{key}"]), key
    assert s["entropy/method"] > 0 and r.method == r.headline.method
    assert r.delta is None and r.delta_tok is r.headline.delta_tok
    assert "per sequence not valid" in str(r) and "per token" in str(r)
    assert r.to_dict()["valid_tok"] is True and r.to_dict()["valid"] is False


def test_a_result_built_without_the_new_field_keeps_one_verdict():
    assert MonitorResult(0, False, "why").valid_tok is False
    assert MonitorResult(0, True).valid_tok is True
    assert MonitorResult(0, True, valid_tok=False).valid_tok is True  # valid per sequence implies per token
