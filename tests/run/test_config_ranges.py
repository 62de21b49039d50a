"""Every numeric key of both programs under values that cannot work (0, negative, 1e-300, 1e308,
inf, nan, a huge int): the program ends in one `error:` naming the key, exit 2, before any model
loads (the model path does not exist: a value that slipped through would fail on it instead)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from isdelta.run.pipeline import main as run_main
from isdelta.score.pipeline import main as score_main

HUGE = str(10**30)
RUN = {"model": {"path": "no-such-model"}, "data": {"path": "builtin:math"}, "update": {"loss": "reinforce"}}
SCORE = {"models": [{"path": "no-such-model"}], "data": {"path": "builtin:score_demo"}}

# (key, value, extra --set, what the message says besides the key)
RUN_CASES = [
    ("seed", "-1", [], "SeedSequence"),
    ("seed", HUGE, [], "2**63 - 1"),
    ("update.lr", "0", [], "> 0"),
    ("update.lr", "-1", [], "> 0"),
    ("update.lr", "1e-300", [], "rounds to a subnormal or 0"),
    ("update.lr", "1e308", [], "overflows"),
    ("update.lr", ".inf", [], "finite"),
    ("update.lr", ".nan", [], "finite"),
    ("update.lr", "1e5", ["model.dtype=float16"], "float16"),
    ("update.steps", "0", [], "[1, 10000]"),
    ("update.steps", HUGE, [], "re-use one batch"),
    ("sampling.num_samples", "1", [], "greater than or equal to 2"),
    ("sampling.num_samples", HUGE, [], "[1, 16384]"),
    ("sampling.max_new_tokens", "0", [], "greater than or equal to 1"),
    ("sampling.temperature", "0", [], "> 0"),
    ("sampling.temperature", "-1", [], "> 0"),
    ("sampling.temperature", "1e-300", [], "overflows float32"),
    ("sampling.temperature", "1e-6", [], "[0.01, 100]"),
    ("sampling.temperature", "1e6", [], "nears uniform"),
    ("sampling.temperature", "1e308", [], "[0.01, 100]"),
    ("sampling.temperature", HUGE, [], "[0.01, 100]"),
    ("sampling.temperature", ".inf", [], "finite"),
    ("sampling.temperature", ".nan", [], "finite"),
    ("sampling.top_k", "-1", [], "non-negative integer"),
    ("sampling.top_k", ".inf", [], "finite"),
    ("sampling.top_p", "0", [], "(0, 1]"),
    ("sampling.top_p", "-1", [], "(0, 1]"),
    ("sampling.top_p", "1e308", [], "(0, 1]"),
    ("sampling.top_p", ".nan", [], "finite"),
    ("sampling.prompts_per_batch", "0", [], "greater than or equal to 1"),
    ("engine.token_budget", "0", [], "greater than or equal to 1"),
    ("estimator.level", "0", [], "greater than 0"),
    ("estimator.level", "1", [], "less than 1"),
    ("estimator.clip", "0", ["estimator.weights=clip"], "greater than 0"),
    ("data.limit", "0", [], "greater than or equal to 1"),
    ("output.n_trace_samples", "-1", [], "greater than or equal to 0"),
    ("probe.sweep", "[1e30]", [], "±1000"),
    ("probe.sweep", "[.inf]", [], "finite"),
    ("tokens.top_k", HUGE, ["tokens={}"], "at most 1000"),
    ("tokens.length_bins", HUGE, ["tokens={}"], "at most 1000"),
    ("tokens.n_boot", HUGE, ["tokens={}"], "at most 100000"),
]
SCORE_CASES = [
    ("models.0.temperature", "0", [], "> 0"),
    ("models.0.temperature", "1e-300", [], "overflows float32"),
    ("models.0.temperature", "1e-6", [], "[0.01, 100]"),
    ("models.0.temperature", "1e6", [], "nears uniform"),
    ("models.0.temperature", "1e308", [], "[0.01, 100]"),
    ("models.0.temperature", ".nan", [], "finite"),
    ("data.max_tokens", "0", [], "greater than or equal to 1"),
    ("data.limit", "-1", [], "greater than or equal to 1"),
    ("engine.token_budget", "0", [], "greater than or equal to 1"),
    ("engine.chunk_texts", "0", [], "greater than or equal to 1"),
    ("curriculum.bins", "0", [], "greater than or equal to 1"),
    ("curriculum.bins", HUGE, [], "more than the corpus's 42 texts"),
    ("curriculum.cycles", HUGE, ["curriculum.schedule=sawtooth"], "more than the corpus's 42 texts"),
    ("predictor.answer.temperature", "1e-300", ["predictor={}"], "overflows float32"),
    ("predictor.answer.temperature", "1e6", ["predictor={}"], "nears uniform"),
    ("predictor.answer.top_k", "-1", ["predictor={}"], "non-negative integer"),
    ("predictor.answer.top_p", "0", ["predictor={}"], "(0, 1]"),
    ("predictor.answer.seed", "-1", ["predictor={}"], "SeedSequence"),
    ("predictor.answer.seed", HUGE, ["predictor={}"], "2**63 - 1"),
    ("predictor.answer.max_new_tokens", "0", ["predictor={}"], "greater than or equal to 1"),
    ("predictor.level", "1", ["predictor={}"], "less than 1"),
    ("predictor.plot_bins", "1", ["predictor={}"], "greater than or equal to 2"),
]


def _run(main, raw: dict, tmp_path, key: str, value: str, extra: list[str], capsys) -> tuple[int, str]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw))
    sets = [a for s in [*extra, f"{key}={value}"] for a in ("--set", s)]
    code = main([str(cfg), *sets, "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


def _check(code: int, err: str, key: str, words: str) -> None:
    assert code == 2 and "Traceback" not in err and "bug in isdelta" not in err, err[-2000:]
    line = err[err.index("error: ") :]
    assert key in line and words in line, line


@pytest.mark.parametrize("key,value,extra,words", RUN_CASES, ids=[f"{k}={v}" for k, v, *_ in RUN_CASES])
def test_run_refuses_each_value_that_cannot_work(tmp_path, capsys, key, value, extra, words):
    _check(*_run(run_main, RUN, tmp_path, key, value, extra, capsys), key, words)


@pytest.mark.parametrize("key,value,extra,words", SCORE_CASES, ids=[f"{k}={v}" for k, v, *_ in SCORE_CASES])
def test_score_refuses_each_value_that_cannot_work(tmp_path, capsys, key, value, extra, words):
    _check(*_run(score_main, SCORE, tmp_path, key, value, extra, capsys), key, words)


@pytest.mark.parametrize(
    "program,raw,key,value",
    [("isdelta.run", RUN, "update.lr", "1e308"), ("isdelta.score", SCORE, "models.0.temperature", "1e-300")],
)
def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path, program, raw, key, value):
    """As a user runs it: the cases of the report (each once was "a bug in isdelta", exit 1)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw))
    cmd = [sys.executable, "-m", program, str(cfg), "--set", f"{key}={value}", "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    _check(res.returncode, res.stderr, key, "must lie in")
    assert not (tmp_path / "out").exists()
