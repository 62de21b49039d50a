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


def fails(res, code: int, *words: str) -> str:
    assert res.returncode == code and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = res.stderr[res.stderr.index("error: ") :]
    assert all(w in line for w in words), line
    return line


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


# ---------------------------------------------------------------------------- statistics that are not finite
def _scaled_checkpoint(checkpoint, tmp_path, scale: float | None, name: str):
    """The test checkpoint with its LM head scaled so its logits reach ``scale`` (finite in
    float32), or set to NaN (``scale`` None): weights whose statistics cannot be computed."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(torch.full_like(w, float("nan")) if scale is None else w * (scale / w.abs().max() / 32))
    path = tmp_path / name
    model.save_pretrained(path)
    for f in checkpoint.iterdir():  # the tokenizer's files
        if "token" in f.name or f.name == "special_tokens_map.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.parametrize("T", ["1e-6", "1e6", "1e-300"])
def test_an_extreme_temperature_is_refused_before_any_model_loads(tmp_path, checkpoint, T):
    """Once exit 0 with every statistic NaN (1e-300) or quietly meaningless (1e-6, 1e6)."""
    res = cli(write_cfg(tmp_path, checkpoint), "--set", f"models.0.temperature={T}")
    fails(res, 2, "models.0.temperature", "must lie in [0.01, 100]")
    assert not (tmp_path / "out").exists()


def test_logits_that_overflow_at_the_temperature_fail_loudly_and_save_nothing(tmp_path, checkpoint):
    """Logits of 1e37 are finite, but divided by T = 0.01 they overflow float32: every statistic
    came out NaN, was saved, and the run exited 0 saying "no scored tokens"."""
    huge = _scaled_checkpoint(checkpoint, tmp_path, 1e37, "huge")
    models = [{"name": "a", "path": str(huge), "temperature": 0.01}]
    res = cli(write_cfg(tmp_path, checkpoint, models=models, compare=None))
    err = fails(res, 2, "models.0 (", "text 't0' (corpus row 0) gave ", " nan", "overflowed", "models.0.temperature")
    assert "no scored tokens" not in res.stdout + err
    assert not (tmp_path / "out" / "models" / "a" / "stats.jsonl").exists()  # nothing NaN is kept for a resume


def test_nan_weights_name_the_model_entry(tmp_path, checkpoint):
    broken = _scaled_checkpoint(checkpoint, tmp_path, None, "broken")
    models = [{"name": "a", "path": str(checkpoint)}, {"name": "b", "path": str(broken)}]
    fails(cli(write_cfg(tmp_path, checkpoint, models=models)), 2, "models.1", "NaN/inf", "check the weights")


def test_saved_statistics_that_are_not_finite_are_shown_as_such_and_fail(tmp_path, checkpoint):
    """A folder scored before scores were checked holds NaN statistics: summary.md says "not finite"
    (never "no scored tokens") and the run does not exit 0."""
    import hashlib

    cfg = write_cfg(tmp_path, checkpoint, models=[{"name": "a", "path": str(checkpoint)}], compare=None)
    score(load_score_config(cfg))
    a = tmp_path / "out" / "models" / "a"
    rows = [json.loads(x) for x in (a / "stats.jsonl").read_text().splitlines()]
    for r in rows[:2]:
        r.update({k: float("nan") for k in ("entropy_mean", "entropy_sum", "varentropy_mean", "nll_sum")})
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (a / "stats.jsonl").write_bytes(data)  # as an older isdelta wrote it: one chunk, its checksum
    (a / "chunks.jsonl").write_text(
        json.dumps({"end": len(data), "lines": len(rows), "sha256": hashlib.sha256(data).hexdigest()}) + "\n"
    )
    res = cli(cfg)
    fails(res, 2, "models/a/stats.jsonl", "2 of 5 scored texts hold NaN/inf statistics", "delete")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "n/a (not finite in 2 of 5 scored texts)" in md
    assert "no scored tokens" not in md and not re.search(r"\bnan\b", md, re.I)


def test_summary_gives_each_missing_figure_its_own_reason():
    from isdelta.score.report import summary_markdown

    base = {"temperature": 1.0, "throughput": {"texts_per_s": None, "tokens_per_s": None}}
    models = {
        "scored": {**base, "n_texts": 3, "n_tokens": 12, "entropy_per_token": 1.5, "bits_per_char": float("nan")},
        "empty": {**base, "n_texts": 0, "n_tokens": 0},
    }
    md = summary_markdown({"name": "x", "corpus": "c", "models": models})
    scored, empty = (next(x for x in md.splitlines() if x.startswith(f"| {n} ")) for n in ("scored", "empty"))
    assert "1.5000" in scored and "n/a (no text scored whole" in scored and "no scored tokens" not in scored
    assert "n/a (no text scored in this run: resumed)" in scored
    assert empty.count("n/a (no scored tokens)") == 4


def test_answers_longer_than_the_context_name_the_key(tmp_path, checkpoint):
    """predictor.answer.max_new_tokens past the model's context (256): once "a bug in isdelta"."""
    qa = [json.dumps({"id": i, "prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(4)]
    predictor = {"outcome": "answer", "answer": {"max_new_tokens": 10**6, "chat": False}}
    cfg = write_cfg(
        tmp_path,
        checkpoint,
        qa,
        predictor=predictor,
        curriculum=None,
        compare=None,
        data={"path": str(tmp_path / "c.jsonl"), "text_field": "prompt"},
    )
    fails(cli(cfg), 2, "predictor.answer", "context of 256", "lower predictor.answer.max_new_tokens")


def test_a_model_rewritten_in_place_is_rescored(tmp_path, checkpoint, capsys):
    """The same command after the checkpoint was overwritten with other weights of the same size
    and its old mtime (``cp -p``, a restore): its saved statistics are not reused (issue 30, kind 2)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    cfg = load_score_config(write_cfg(tmp_path, checkpoint))
    score(cfg)
    first = (tmp_path / "out" / "models" / "a" / "stats.jsonl").read_text()
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp_path / "other")
    target = checkpoint / "model.safetensors"
    st = target.stat()
    shutil.copyfile(tmp_path / "other" / "model.safetensors", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    score(cfg)
    err = capsys.readouterr().err
    assert "the model's files changed since these texts were scored" in err
    assert (tmp_path / "out" / "models" / "a" / "stats.jsonl").read_text() != first
    capsys.readouterr()
    score(cfg)  # unchanged since: everything reused
    assert "changed since" not in capsys.readouterr().err
