"""The run's report when only the per-token headline holds (issue 26): the per-token ΔH is printed
as the headline, the per-sequence one says plainly that it is not valid and why, and the tables
hide the chosen method's per-sequence figures but not its per-token ones."""

from __future__ import annotations

import pytest

from isdelta.estimators import checks
from isdelta.run.bounds import Shown
from isdelta.run.report import headline, headline_lines
from tests.estimators.test_long_completions import V, verdicts


@pytest.fixture()
def tok_only(monkeypatch):
    """A headline valid per token only: long completions, the sequence level's k̂ check at 0.3."""
    monkeypatch.setattr(checks, "TERMS_KHAT", 0.3)
    monkeypatch.setattr(checks, "TERMS_KHAT_TOK", float("inf"))
    sets, _ = verdicts(alpha=0.3, eos0=0.0, C=128, n_sets=6)
    return next((h, toks, res) for h, toks, res in sets if h.valid_tok and not h.valid and h.method in ("cv", "pd"))


def test_the_per_token_headline_leads_and_the_sequence_level_says_why(tok_only):
    h, toks, snis = tok_only
    res = next(t for t in toks if t.method == h.method)
    shown = Shown.of(h, V, 128)
    first, second = headline_lines(snis, h, shown)
    assert first.startswith("ΔH per token = ") and h.method in first
    assert second.startswith("ΔH per sequence: not valid on these samples") and "Pareto k̂" in second
    assert shown.reason("delta_tok", res.delta_tok.value, h.method, h0=res.h0_tok.value) is None
    assert shown.reason("delta", res.delta.value, h.method, h0=res.h0.value).startswith(f"{h.method} rejected")
    report = headline(snis, h)
    assert report["valid"] is False and report["valid_tok"] is True and report["delta"] is None
    assert report["delta_tok"]["value"] == pytest.approx(h.delta_tok.value)
