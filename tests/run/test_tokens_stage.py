"""The run's `tokens:` stage end to end on a tiny checkpoint: carriers, outputs, resume."""

from __future__ import annotations

import csv
import json

from isdelta.run import run
from isdelta.run.config import load_config

ROWS = [{"prompt": "1+1=", "answer": "2", "response": "2"}, {"prompt": "hi", "answer": "0", "response": "hello"}]


def test_tokens_stage_writes_tables_and_plots_and_resumes(tmp_path, checkpoint, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    cfg = load_config(
        {
            "model": {"path": str(checkpoint)},
            "data": {"path": str(data)},
            "update": {"loss": "sft", "lr": 0.5},
            "estimator": {"weights": "none"},
            "sampling": {"num_samples": 2, "max_new_tokens": 6, "temperature": 0.8},
            "output": {"dir": str(tmp_path / "out"), "n_trace_samples": 0},
            "tokens": {"mode": "both", "positions": "every:2", "n_interesting": 2},
        }
    )
    report = run(cfg)
    out = tmp_path / "out"
    files = [
        "tokens.csv",
        "tokens.json",
        "tokens.md",
        "tokens_entropy_steps.png",
        "tokens_entropy_hist.png",
        "tokens_top1_delta.png",
    ]
    assert all((out / f).exists() for f in files) and (out / "samples_p1").is_dir()
    with open(out / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["carrier"] for r in rows} == {"p0 samples", "p1 samples", "reference"}
    assert all(int(r["step"]) % 2 == 0 for r in rows)
    # the reference carrier scores the response tokens + EOS: "2</s>" and "hello</s>", steps 0, 2, 4
    ref = [(r["row"], r["step"], r["token"]) for r in rows if r["carrier"] == "reference"]
    assert ref == [("0", "0", "2"), ("1", "0", "h"), ("1", "2", "l"), ("1", "4", "o")]
    tok = report["tokens"]
    assert "markdown" not in tok and tok["summary"]["n_positions"] == len(rows)
    assert set(tok["summary"]["carriers"]) == {"p0 samples", "p1 samples", "reference"}
    summary = (out / "summary.md").read_text()
    assert "## Token-level diagnostics" in summary and "| category (p0's class) |" in summary
    assert "token classes on reference" in capsys.readouterr().out

    from isdelta import tokens

    def again(*a, **k):
        raise AssertionError("resumed run recomputed the token stage")

    monkeypatch.setattr(tokens, "run_tokens", again)
    assert run(cfg)["tokens"] == report["tokens"]
