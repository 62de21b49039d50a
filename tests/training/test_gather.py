"""gather_rows and the monitor over two gloo processes on CPU, against one process on all rows."""

from __future__ import annotations

import datetime
import json
import os
import socket
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from isdelta.engine import EngineConfig, Rollouts
from isdelta.training import EntropyMonitor, gather_rows

ENGINE = EngineConfig(progress=False)
WORLD = 2
# raw SNIS weights: no arviz import in the spawned processes (PSIS is tested elsewhere; this file
# tests that the rows of all ranks reach the estimator)
OPTIONS = {"engine_config": ENGINE, "weights": "none"}


class ToyBody(torch.nn.Module):
    """A causal body: each position sees its token, its position and the mean of the real tokens
    up to it (left pads masked out)."""

    def __init__(self, V: int = 96, D: int = 16, T: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(V, D), torch.nn.Embedding(T, D)
        self.mix = torch.nn.Linear(2 * D, D)

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        x = self.tok(input_ids) + self.pos(position_ids)  # [n, W, D]
        m = attention_mask[..., None].to(x.dtype)  # [n, W, 1]
        prefix = (x * m).cumsum(1) / m.cumsum(1).clamp(min=1)  # [n, W, D], causal
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(torch.cat([x, prefix], -1))))


class ToyLM(torch.nn.Module):
    """The engine's model interface (``base_model``, ``get_output_embeddings``, ``config``) in plain
    torch: spawned processes then import neither transformers nor its model code (seconds each
    on a 2-core machine), and get the same weights from the seed."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.base_model, self.lm_head = ToyBody(), torch.nn.Linear(16, 96, bias=False)
        self.config = SimpleNamespace(eos_token_id=2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        h = self.base_model(input_ids, attention_mask, position_ids).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(h))


def tiny_model():
    """p0 and the parameters of p1 (p0 plus seeded noise, small enough for a readable step)."""
    model = ToyLM(seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    p1 = [p.detach() + 0.02 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
    return model, p1


def rollouts(P=4, G=5, V=96) -> Rollouts:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, V, size=rng.integers(1, 6)).tolist() for _ in range(P)]
    comps = [rng.integers(2, V, size=rng.integers(1, 8)).tolist() for _ in range(P * G)]
    return Rollouts.from_token_lists(prompts, comps, eos_token_ids=2, pad_token_id=2)


def shard(ro: Rollouts, rank: int) -> list[int]:
    """Interleaved rows: every prompt's rows are split over both ranks, as GRPO samplers do."""
    return list(range(rank, ro.n_rows, WORLD))


def fixed_rows(rank: int) -> dict:
    """Ragged per-rank arrays (3 rows on rank 0, 5 on rank 1), one field None everywhere."""
    n, lo = (3, 0) if rank == 0 else (5, 3)
    idx = np.arange(lo, lo + n)
    return {"log_p0": -0.5 * idx, "group": idx // 2, "token": np.stack([idx, idx + 1], 1), "entropy_sum0": None}


def set_p1(model, p1) -> None:
    with torch.no_grad():
        for p, new in zip(model.parameters(), p1):
            p.copy_(new)


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: gather fixed arrays, a key mismatch, two monitored steps (one failing on rank 1)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        out = {"merged": {k: (None if v is None else v.tolist()) for k, v in gather_rows(fixed_rows(rank)).items()}}
        try:
            gather_rows({"a": np.zeros(2)} if rank == 0 else {"b": np.zeros(2)})
        except ValueError as e:
            out["mismatch"] = str(e)
        model, p1 = tiny_model()
        ro = rollouts()
        mon = EntropyMonitor(model, **OPTIONS)
        snap = mon.before(ro.select(shard(ro, rank)))
        set_p1(model, p1)
        out["result"] = mon.after(snap).to_dict()
        bad = torch.zeros(3, 3) if rank == 1 else None  # a wrong old_logp on rank 1 only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            failed = mon.after(mon.before(ro.select(shard(ro, rank)), old_logp=bad))
        out["failed"] = failed.to_dict()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_gather_rows_concatenates_in_rank_order(ranks):
    expected = {
        k: (None if k == "entropy_sum0" else np.concatenate([fixed_rows(r)[k] for r in range(WORLD)]))
        for k in fixed_rows(0)
    }
    for out in ranks:
        assert out["merged"]["entropy_sum0"] is None
        for k in ("log_p0", "group", "token"):
            assert np.array_equal(np.array(out["merged"][k]), expected[k]), k
        assert "rank 1 sent keys ['b'] but rank 0 sent ['a']" in out["mismatch"]


def test_two_ranks_give_the_estimate_of_one_process_on_all_rows(ranks):
    model, p1 = tiny_model()
    ro = rollouts()
    order = shard(ro, 0) + shard(ro, 1)  # rank order of the gathered rows
    mon = EntropyMonitor(model, **OPTIONS, distributed="local")
    snap = mon.before(ro.select(order))
    set_p1(model, p1)
    one = mon.after(snap).to_dict()
    assert one["valid"] and abs(one["delta"]) > 1e-3  # p1 moved away from p0: ΔH ≠ 0
    for out in ranks:
        res = out["result"]
        assert res["valid"] and res["n_rows"] == ro.n_rows == one["n_rows"]
        for key in (
            "delta",
            "delta_se",
            "delta_ci_low",
            "delta_ci_high",
            "delta_tok",
            "delta1",
            "h0",
            "h1",
            "delta_snis",
            "delta_snis_se",
            "direct",
            "path_shift",
            "per_decision",
        ):
            assert res[key] == pytest.approx(one[key], abs=1e-5), key
    assert ranks[0]["result"] == ranks[1]["result"] | {"seconds": ranks[0]["result"]["seconds"]}


def test_a_failure_on_one_rank_invalidates_every_rank(ranks):
    for out in ranks:
        assert not out["failed"]["valid"]
        assert "old_logp" in out["failed"]["reason"]
    assert ranks[0]["failed"]["reason"].startswith("rank 1: ")


def test_gather_rows_without_a_process_group_copies():
    rows = {"x": torch.arange(3.0), "y": None}
    out = gather_rows(rows)
    assert isinstance(out["x"], np.ndarray) and out["x"].tolist() == [0.0, 1.0, 2.0] and out["y"] is None
    with pytest.raises(TypeError, match="mapping"):
        gather_rows([1, 2])
