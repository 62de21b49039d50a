"""``torchrun --nproc-per-node 2 -m isdelta.score``: each rank scores half the corpus into its own
store, rank 0 writes the models' folders from the halves; everything equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from isdelta.score import score
from isdelta.score.config import load_score_config
from tests.conftest import json_numbers
from tests.score.test_score import TEXTS, cfg_dict, read_jsonl


def test_two_gloo_processes_score_the_corpus_as_one(tmp_path, checkpoint):
    raw = cfg_dict(tmp_path, checkpoint, compare={"stat": "entropy_mean"})
    (tmp_path / "cfg.yaml").write_text(json.dumps(raw))
    one = score(load_score_config(raw), tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "isdelta.score", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    skip = ("timings", "throughput", "versions", "name", "corpus")
    a, b = dict(json_numbers(one, skip)), dict(json_numbers(two, skip))
    assert a.keys() == b.keys() and len(a) > 30
    bad = {k: (a[k], b[k]) for k in a if not np.isclose(a[k], b[k], rtol=1e-6, atol=1e-6, equal_nan=True)}
    assert not bad, bad
    for name in ("a", "b"):
        rows1 = read_jsonl(tmp_path / "one" / "models" / name / "stats.jsonl")
        rows2 = read_jsonl(tmp_path / "two" / "models" / name / "stats.jsonl")
        assert [r["id"] for r in rows2] == [r["id"] for r in rows1] and len(rows1) == len(TEXTS) + 1
        for r1, r2 in zip(rows1, rows2):
            for k, v in r1.items():
                assert v == r2[k] if not isinstance(v, float) else np.isclose(v, r2[k], rtol=1e-6, atol=1e-6), k
        # the halves: rank 0 texts 0-4, rank 1 texts 5-8, each in its own verified store
        halves = [
            read_jsonl(tmp_path / "two" / "models" / name / "ranks" / f"{k}-of-2" / "stats.jsonl") for k in (0, 1)
        ]
        assert [len(h) for h in halves] == [5, 4] and halves[1][0]["index"] == 5
    assert two["models"]["a"]["throughput"]["texts"] == len(TEXTS) + 1
    assert (tmp_path / "two" / "curriculum" / "manifest.json").exists()
    # a rerun finds every model scored: nothing is loaded again
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all texts already scored" in again.stderr and "[isdelta] load" not in again.stderr
