"""`python -m isdelta.run` under bad input and damaged folders, run as a user runs it: every
failure one line ``error: <what> — <why> — <fix>`` with its exit code and no traceback; checks
that need only the config, the data and the tokenizers before the first sample; resume that
verifies what it reuses; no impossible number printed as a number."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from isdelta.run import RunError, run
from isdelta.run.config import load_config

ROWS = [
    {"prompt": "1+1=", "answer": "2", "response": "2"},
    {"prompt": "2+3=", "answer": "5", "response": "5"},
    {"prompt": "hi", "answer": "0", "response": "hello"},
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_cfg(tmp_path, checkpoint, rows=ROWS, **sections) -> str:
    """cfg.yaml (JSON is YAML) of a small sft run on the tiny checkpoint; returns its path."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    raw = {
        "model": {"path": str(checkpoint)},
        "data": {"path": str(data)},
        "update": {"loss": "sft", "lr": 0.003},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "prompts_per_batch": 2},
        "estimator": {"weights": "none"},
        "output": {"dir": str(tmp_path / "out"), "plots": False},
    }
    for k, v in sections.items():
        raw[k] = v if not isinstance(v, dict) else {**raw.get(k, {}), **v}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return str(path)


def cli(*args, module: str = "isdelta.run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )


def fails(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert the exit code, no traceback, and the words of the one error line; return stderr."""
    err = res.stderr
    assert res.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = err[err.index("error: ") :]  # the line (a config error lists its keys below it)
    for w in words:
        assert w in line, (w, line)
    return err


# ---------------------------------------------------------------------------- before any work
BAD_INPUT = {
    "yaml syntax in the file": (None, ["cfg.yaml is not valid YAML", "line 2, column 1"]),
    "yaml syntax in --set": (["--set", "update.lr=[1"], ["--set update.lr=[1", "not valid YAML"]),
    "unknown device": (["--set", "model.device=gpu0"], ["model.device", "unknown device"]),
    "inf temperature": (["--set", "sampling.temperature=.inf"], ["sampling.temperature", "finite"]),
    "inf clip": (["--set", "estimator.clip=.inf"], ["estimator.clip", "finite"]),
    "empty stop string": (["--set", "sampling.stop_strings=['']"], ["sampling.stop_strings.0"]),
    "missing model": (["--set", "model.path=/nonexistent/p0"], ["model.path", "no such folder"]),
    "reinforce without answers": (["--set", "update.loss=reinforce", "--set", "data.answer_field=gold"], ["gold"]),
    "out under a file": (["--out", "{tmp}/data.jsonl/out"], ["--out", "is a file"]),
    "a bare string row": (["--set", "data.path={tmp}/bare.jsonl"], ["bare.jsonl:2", "not an object"]),
    # issue 30, kind 4: a string under messages was sent as a raw prompt, without the chat template
    "messages a string": (["--set", "data.path={tmp}/chat_str.jsonl"], ["chat_str.jsonl:1", "'messages' is a string"]),
    "messages empty": (["--set", "data.path={tmp}/chat_empty.jsonl"], ["chat_empty.jsonl:1", "'messages' is empty"]),
    "a message without content": (["--set", "data.path={tmp}/chat_bad.jsonl"], ["chat_bad.jsonl:1", "message 0"]),
}
CHATS = {"chat_str": "1+1=", "chat_empty": [], "chat_bad": [{"role": "user"}]}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_before_any_sample(tmp_path, checkpoint, case):
    args, words = BAD_INPUT[case]
    cfg = write_cfg(tmp_path, checkpoint)
    (tmp_path / "bare.jsonl").write_text(json.dumps(ROWS[0]) + '\n"just a string"\n')
    for name, messages in CHATS.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"messages": messages, "response": "2"}) + "\n")
    if args is None:
        (tmp_path / "cfg.yaml").write_text("model: {path: x\n")
        args = []
    schema = case in ("unknown device", "inf temperature", "inf clip", "empty stop string")  # a key list
    fails(cli(cfg, *[a.format(tmp=tmp_path) for a in args]), 2, *words, "invalid config" if schema else " — ")
    assert not (tmp_path / "out" / "samples").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_machine(tmp_path, checkpoint):
    fails(cli(write_cfg(tmp_path, checkpoint), "--set", "model.device=cuda"), 2, "model.device", "not available")


def test_tokenizer_and_context_checks_run_before_sampling(tmp_path, checkpoint, char_tok):
    """Another vocabulary as ``updated``, and prompts past the context (RoPE and GPT-2)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other"
    tok = char_tok.__class__.from_pretrained(checkpoint)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    cfg = write_cfg(tmp_path, checkpoint, update=None, updated={"path": str(other)})
    fails(cli(cfg), 2, "updated.path", "tokenizer", "vocab size 96 vs 97")
    cfg = write_cfg(tmp_path, checkpoint, sampling={"max_new_tokens": 250})
    fails(cli(cfg), 2, "data.jsonl: lines [1, 2, 3]", "context of 256", "max_new_tokens 250")
    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=2, n_positions=16, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    char_tok.save_pretrained(gpt2)
    fails(cli(write_cfg(tmp_path, gpt2)), 2, "context of 16 positions")  # "<u>1+1=\n<a>" + 8 > 16
    assert not (tmp_path / "out" / "samples").exists()


def test_a_step_that_breaks_float32_weights_names_the_step(tmp_path, checkpoint):
    err = fails(cli(write_cfg(tmp_path, checkpoint, update={"lr": 1e30})), 2, "update.lr", "lower update.lr")
    assert "float16" not in err


def test_ctrl_c_says_what_was_saved_and_the_same_command_resumes(tmp_path, checkpoint):
    # 300 update steps keep "make p1" busy for a few seconds, so the signal lands inside it
    # whatever the machine's load (one step finished before a loaded test runner sent it)
    cfg = write_cfg(tmp_path, checkpoint, update={"steps": 300}, probe={"sweep": [1.0], "per_token": False})
    proc = subprocess.Popen(
        [sys.executable, "-m", "isdelta.run", cfg],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=ENV,
        # as in a terminal: a test runner started in the background (`cmd &`) ignores SIGINT, and
        # its children would inherit that and never see the Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:
        if line.startswith("[isdelta] make p1 ..."):
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130 and "Traceback" not in err, err[-2000:]
    assert "scores0.npz" in err and "p0's samples for 2 chunk(s)" in err and "rerun the same command" in err
    res = cli(cfg)
    assert res.returncode == 0 and "note:" not in res.stderr, res.stderr[-2000:]  # every saved part verified


# ---------------------------------------------------------------------------- resume that verifies
def test_damaged_parts_are_named_and_recomputed_to_the_same_numbers(tmp_path, checkpoint, capsys):
    cfg = load_config(write_cfg(tmp_path, checkpoint))
    first = run(cfg)
    out = tmp_path / "out"
    (out / "samples" / "part-0001.pt").write_bytes((out / "samples" / "part-0001.pt").read_bytes()[:100])
    (out / "scores0.npz").write_bytes(b"garbage")
    (out / "update.json").write_text("")
    (out / "config_hash").write_text("")
    capsys.readouterr()
    again = run(cfg)
    err = capsys.readouterr().err
    assert "samples/part-0001.pt is damaged" in err and "scores0.npz" in err and "update.json" in err
    assert "different config" not in err
    assert again["estimate"] == first["estimate"] and again["headline"] == first["headline"]


def test_an_edited_grown_or_shrunk_data_file_is_refused(tmp_path, checkpoint):
    cfg = write_cfg(tmp_path, checkpoint)
    run(load_config(cfg))
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace("1+1=", "9+9="))
    fails(cli(cfg), 2, "holds results for other data", "--out NEW_DIR")
    for rows in (ROWS + [{"prompt": "4+4=", "answer": "8", "response": "8"}], ROWS[:2]):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(RunError, match="other data"):
            run(load_config(cfg))


# ---------------------------------------------------------------------------- no impossible number
def test_a_huge_step_on_a_small_run_prints_no_impossible_number(tmp_path, checkpoint, capsys):
    """12 rows (k̂ not estimable), SFT at lr 2: the policy rejects every method; no negative
    KL, no H(p1) outside [0, ln V], no ΔH past its bounds is printed as a number."""
    report = run(load_config(write_cfg(tmp_path, checkpoint, update={"lr": 2.0})))
    out = capsys.readouterr().out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert not report["headline"]["valid"] and report["not_shown"]
    for text in (out, summary):
        assert not re.search(r"\bnan\b", text, re.I)
        for line in text.splitlines():
            cells = [c.strip() for c in line.replace("|", "  ").split("  ") if c.strip()]
            if cells and cells[0].startswith(("KL(p1‖p0)", "H(p1)")):  # the tables' rows
                low, high = (0, np.inf) if cells[0].startswith("KL") else (0, 8 * np.log(96))
                assert cells[1].startswith("n/a (") or low <= float(cells[1]) <= high, line
    assert "n/a (snis" in summary or "n/a (snis_rb" in summary


# ---------------------------------------------------------------------------- models rewritten in place
def rewrite_keeping_size_and_mtime(folder, source) -> None:
    """What ``cp -p`` / ``rsync -a`` / a restore do: other weights, the old size and mtime."""
    import shutil

    target = folder / "model.safetensors"
    st = target.stat()
    shutil.copyfile(source / "model.safetensors", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.fixture
def other_weights(tmp_path):
    """The tiny Llama of ``checkpoint`` with other random weights (same size file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path / "other"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["model", "updated"])
def test_a_model_rewritten_in_place_never_has_its_old_parts_reused(tmp_path, checkpoint, other_weights, which, capsys):
    """p0 (``model.path``) or p1 (``updated:``) rewritten between two runs of one command with its
    old size and mtime: every part it made is recomputed, and the report equals a fresh run's on
    the new weights (issue 30, kind 2)."""
    import shutil

    p1 = tmp_path / "p1"
    shutil.copytree(checkpoint, p1)
    rewrite_keeping_size_and_mtime(p1, other_weights)  # p1 ≠ p0
    cfg = load_config(write_cfg(tmp_path, checkpoint, update=None, updated={"path": str(p1)}))
    first = run(cfg)
    rewrite_keeping_size_and_mtime(
        checkpoint if which == "model" else p1, other_weights if which == "model" else checkpoint
    )
    capsys.readouterr()
    again = run(cfg)
    err = capsys.readouterr().err
    recomputed = ["scores1.npz"] + (["samples/part-0000.pt", "scores0.npz"] if which == "model" else [])
    assert all(f"{part} was computed from other inputs" in err for part in recomputed), err
    fresh = run(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "fresh")})}))
    assert again["estimate"] == fresh["estimate"] and again["estimate"] != first["estimate"]
    assert again["identity"][which] != first["identity"][which]


# ---------------------------------------------------------------------------- a report, whatever the step
@pytest.mark.parametrize("lr", [100.0, 1e5])
def test_a_step_of_any_size_ends_in_a_report_whose_headline_is_refused(tmp_path, checkpoint, lr):
    """SFT at lr 100 crashed the report (ZeroDivisionError in the SNIS checks) after sampling,
    scoring and the update, and every rerun crashed the same way (issue 30, kind 9)."""
    res = cli(write_cfg(tmp_path, checkpoint, update={"lr": lr}))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["headline"]["valid"] and "✗" in report["headline"]["reason"]
    assert "ΔH: not valid on these samples" in res.stdout


def test_scores_the_estimators_refuse_still_give_a_report(tmp_path, checkpoint):
    """top-k 3 and a large step: p1's kept set leaves out tokens p0 sampled, log p1 = −inf. The
    folder holds every part; it must yield a report (refused, with the reason), not an error that
    every rerun repeats."""
    cfg = write_cfg(tmp_path, checkpoint, update={"lr": 2.0}, sampling={"top_k": 3})
    for _ in range(2):  # the rerun reports from the saved parts the same way
        res = cli(cfg)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["headline"]["valid"] is False and report["estimate"] is None
        assert "kept set leaves out tokens p0 sampled" in report["headline"]["reason"]
        summary = (tmp_path / "out" / "summary.md").read_text()
        assert "ΔH: not valid — the estimators refused these scores" in summary and "sampling.top_k" in summary


def test_plots_that_fail_are_left_out_of_a_report_that_says_so(tmp_path, checkpoint, capsys):
    """A figure never costs the numbers: a plot's file in the way (a folder) leaves that plot out;
    report.json and summary.md are written and list why."""
    cfg = load_config(write_cfg(tmp_path, checkpoint, output={"plots": True}))
    (tmp_path / "out" / "weights.png").mkdir(parents=True)
    report = run(cfg)
    assert report["problems"] and "the plots could not be drawn (IsADirectoryError" in report["problems"][0]
    assert "not in this report: the plots could not be drawn" in (tmp_path / "out" / "summary.md").read_text()
    assert "[isdelta] warning: the plots could not be drawn" in capsys.readouterr().err


def test_a_probe_sweep_that_overflows_the_weights_names_the_key(tmp_path, checkpoint):
    """probe.sweep [1000] after a large step: the swept weights' logits overflow. It ended in the
    "bug in isdelta" line; now one line naming probe.sweep (issue 30, kind 10)."""
    cfg = write_cfg(tmp_path, checkpoint, update={"lr": 1e10}, probe={"sweep": [1000.0], "per_token": False})
    fails(cli(cfg), 2, "probe: scoring the sweep gave NaN/inf logits", "lower probe.sweep's largest |α|")
