"""`python -m isdelta.score` under bad input and damaged folders, run as a user runs it: one
line per failure with its exit code, the corpus checked before any model loads, a locked store,
damaged statistics named and rescored to the same numbers, no "nan" in summary.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from isdelta.program import folder_lock
from isdelta.score import score
from isdelta.score.config import load_score_config

TEXTS = ["The cat sat.", "2 + 2 = 4", "qzx vbnm plok", "hello hello", "Roses are red."]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_cfg(tmp_path, checkpoint, lines=None, **sections) -> str:
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(TEXTS)] if lines is None else lines
    corpus.write_text("".join(x + "\n" for x in lines))
    raw = {
        "models": [{"name": "a", "path": str(checkpoint)}, {"name": "b", "path": str(checkpoint), "temperature": 0.7}],
        "data": {"path": str(corpus)},
        "engine": {"chunk_texts": 2, "token_budget": 64},
        "curriculum": {"bins": 2},
        "output": {"dir": str(tmp_path / "out"), "plots": False},
    }
    raw.update(sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "isdelta.score", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def fails(res, code: int, *words: str) -> None:
    assert res.returncode == code and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = res.stderr[res.stderr.index("error: ") :]
    assert all(w in line for w in words), line


BAD_CORPUS = {
    "empty corpus": ([], ["holds no texts"]),
    "two texts to compare": ([json.dumps({"text": "a"}), json.dumps({"text": "b"})], ["≥ 3 texts", "compare: null"]),
    "a bare string row": ([json.dumps({"text": "a"}), '"just a string"'], ["c.jsonl:2", "no 'text' field"]),
    "not UTF-8": ([], ["c.jsonl:2", "not UTF-8"]),
}


@pytest.mark.parametrize("case", list(BAD_CORPUS))
def test_the_corpus_is_checked_before_any_model_loads(tmp_path, checkpoint, case):
    lines, words = BAD_CORPUS[case]
    cfg = write_cfg(tmp_path, checkpoint, lines)
    if case == "not UTF-8":
        (tmp_path / "c.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff\xfe"}\n')
    fails(cli(cfg), 2, *words)
    assert not (tmp_path / "out" / "models").exists()


def test_inf_temperature_and_a_folder_in_use(tmp_path, checkpoint):
    cfg = write_cfg(tmp_path, checkpoint)
    fails(cli(cfg, "--set", "models.0.temperature=.inf"), 2, "models.0.temperature", "finite")
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "output.dir"):  # another run holds it
        fails(cli(cfg), 4, "in use by another isdelta run", f"pid {os.getpid()}")
    assert not (out / "models").exists()


def test_damaged_statistics_are_named_and_rescored_to_the_same_numbers(tmp_path, checkpoint, capsys):
    cfg = load_score_config(write_cfg(tmp_path, checkpoint))
    first = score(cfg)
    a, b = tmp_path / "out" / "models" / "a", tmp_path / "out" / "models" / "b"
    (a / "stats.jsonl").write_text("")  # emptied beside done.json
    half = (b / "stats.jsonl").read_bytes()
    (b / "stats.jsonl").write_bytes(half[: len(half) // 2])  # half-written beside done.json
    (b / "stamp").write_text("")  # emptied stamp: done.json vouches for the settings
    capsys.readouterr()
    again = score(cfg)
    err = capsys.readouterr().err
    assert "models/a/stats.jsonl: chunk 0" in err and "models/b/stats.jsonl: chunk" in err and "stamp is empty" in err
    for name in ("a", "b"):
        keep = ("n_texts", "entropy_per_token", "nll_per_token_bits")
        assert {k: again["models"][name][k] for k in keep} == {k: first["models"][name][k] for k in keep}


def test_summary_never_shows_nan(tmp_path, checkpoint):
    """Identical texts: every per-text statistic is constant, rank correlations are undefined."""
    lines = [json.dumps({"text": "same"})] * 4
    summary = score(load_score_config(write_cfg(tmp_path, checkpoint, lines, curriculum=None)))
    md = (tmp_path / "out" / "summary.md").read_text()
    assert not re.search(r"\bnan\b", md, re.I) and "n/a (constant values" in md
    assert summary["comparison"]["n_texts"] == 4


def test_a_run_folder_is_not_taken_for_a_score_folder_nor_the_reverse(tmp_path, checkpoint):
    from isdelta.run import RunError, run
    from isdelta.run.config import load_config

    cfg = write_cfg(tmp_path, checkpoint)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "parts.json").write_text("{}")
    fails(cli(cfg), 2, "holds an isdelta.run run")
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / "derived_stamp").write_text("x\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n")
    run_cfg = {"model": {"path": str(checkpoint)}, "data": {"path": str(data)}, "update": {"loss": "sft"}}
    with pytest.raises(RunError, match="holds an isdelta.score run"):
        run(load_config(run_cfg), tmp_path / "scored")
