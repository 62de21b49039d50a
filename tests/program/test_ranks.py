"""Ranks under torch.distributed (2 gloo processes, spawned): shares, errors every rank agrees on,
and the update step's gradient sum."""

from __future__ import annotations

import itertools
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from isdelta.program import ConfigError
from isdelta.program.ranks import PeerFailed, Ranks, split


def test_split_is_contiguous_in_order_and_balanced():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [split(n, world, r) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_device_and_agree_are_plain():
    r = Ranks()
    assert r.root and r.device("cuda:1") == "cuda:1" and r.agree(lambda: 5) == 5 and r.gather(1) == [1]
    with pytest.raises(ValueError):
        r.agree(lambda: int("x"))


def test_several_ranks_take_one_device_each():
    r = Ranks(rank=1, world=2, local_rank=1)
    assert r.device("cuda") == "cuda:1" and r.device("cpu") == "cpu"
    with pytest.raises(Exception, match=r"model.device: cuda:0 with 2 torchrun processes .* set model.device: cuda"):
        r.device("cuda:0")


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from isdelta.program.ranks import ranks

    r = ranks()
    seen = {"backend": r.backend, "shares": r.gather(rank * 10), "root": r.gather_to_root(rank)}

    def fails_on_1():
        if rank == 1:
            raise ConfigError("data.path: bad row 7", fix="fix row 7")
        return "ok"

    for name, work in (("one fails", fails_on_1), ("both fail", lambda: int("x"))):
        try:
            r.agree(work)
            seen[name] = None
        except Exception as e:
            seen[name] = [type(e).__name__, str(e), getattr(e, "quiet", False), int(getattr(e, "code", 1))]
    # the distributed update on each rank's half equals one process's update on all rows
    seen["update"] = _updated(list(range(4 * rank, 4 * rank + 4)), distributed=True)  # 2 prompts each
    r.close()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(seen, f)


REWARDS = [1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0]  # prompt 1 (rows 2-3) has no advantage


def _updated(rows: list[int] | None = None, distributed: bool = False) -> dict:
    """One AdamW reinforce step of the tiny Llama on ``rows`` of an 8-row batch (4 prompts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from isdelta.engine import Rollouts
    from isdelta.training import update
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    g = torch.Generator().manual_seed(1)
    prompts = [[1, *torch.randint(3, 96, (3,), generator=g).tolist()] for _ in range(4)]
    comps = [torch.randint(3, 96, (n,), generator=g).tolist() + [2] for n in (5, 2, 7, 3, 4, 6, 1, 3)]
    group = [i // 2 for i in range(8)]
    batch = Rollouts.from_token_lists(
        [prompts[p] for p in group], comps, group=group, eos_token_ids=[2], pad_token_id=2
    )
    rows = rows or list(range(8))
    res = update(
        model,
        loss="reinforce",
        rollouts=batch.select(rows),
        rewards=[REWARDS[i] for i in rows],
        optimizer="adamw",
        lr=1e-3,
        distributed=distributed,
        progress=False,
    )
    return {"result": res.to_dict(), "param": float(model.lm_head.weight.double().sum())}


def test_two_gloo_ranks_agree_on_errors_and_sum_the_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{k}.json").read_text()) for k in (0, 1))
    assert r0["backend"] == "gloo" and r0["shares"] == r1["shares"] == [0, 10] and r0["root"] == [0, 1]
    assert r1["root"] is None
    # rank 1's error is printed by rank 1 (exit 2); rank 0 stops quietly with the same code
    assert r1["one fails"] == ["ConfigError", "data.path: bad row 7 — fix row 7", False, 2]
    assert r0["one fails"][0] == "PeerFailed" and r0["one fails"][2:] == [True, 2]
    assert "rank 1 of 2 stopped: data.path: bad row 7" in r0["one fails"][1]
    # the same error on both ranks: rank 0 prints it, rank 1 stays quiet
    assert r0["both fail"][:1] + r0["both fail"][2:] == ["ValueError", False, 1]
    assert r1["both fail"][:1] + r1["both fail"][2:] == ["ValueError", True, 1]
    one = _updated()
    for r in (r0, r1):
        u, ref = r["update"]["result"], one["result"]
        assert u["n_tokens"] == ref["n_tokens"] and u["n_rows"] == 8
        assert u["mean_reward"] == pytest.approx(ref["mean_reward"]) and u["active_prompt_fraction"] == 0.75
        assert u["losses"] == pytest.approx(ref["losses"], rel=1e-6) and u["grad_norms"] == pytest.approx(
            ref["grad_norms"], rel=1e-6
        )
        # a sum of 3072 float32 weights: the ranks sum the gradient in another order, so it differs
        # from one process at ~1e-6 relative (2.3e-6 seen); a rank's gradient missing moves it by far more
        assert r["update"]["param"] == pytest.approx(one["param"], rel=1e-5)
    assert r0["update"] == r1["update"]  # one model on every rank
    assert PeerFailed.quiet
