"""verl's real actor worker on the CPU: the platform, one gloo process, a tiny model and its samples.

Runs in ``.venv-verl`` (``make test-verl``); where verl is not installed (``.venv``) nothing here
imports it and the test modules skip. The environment must be set before verl is imported: verl
resolves its platform once and several of its modules cache the device name at import.

What is real: verl 0.9.1's ``ActorRolloutRefWorker`` (role "actor", FSDP2 engine, AdamW, PPO loss),
its ``DataProto`` / TensorDict plumbing and the trainer methods the adapters override. What is
not: Ray. The worker's methods are called in this process, where a ``RayWorkerGroup`` would send
them to worker processes (``@register`` only attaches dispatch metadata), and ``fit()`` is not run
(it needs a vLLM or SGLang rollout server): the tests run the slice of it between the rollout and
the metrics, on samples drawn from the same weights by ``transformers``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

_VERL = importlib.util.find_spec("verl")
HAVE_VERL = _VERL is not None and _VERL.origin is not None  # a package, not some folder named verl
if HAVE_VERL:
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    # the FSDP engine is registered for cuda / npu only; verl's registry reads this to pick it
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # registers "cpu" with verl's PlatformRegistry; loaded by path because verl's wheel ships a
    # top-level ``tests`` package that shadows this checkout's
    _spec = importlib.util.spec_from_file_location(
        "isdelta_verl_cpu_platform", Path(__file__).with_name("cpu_platform.py")
    )
    cpu_platform = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(cpu_platform)

PROMPTS = ("the sky is", "two plus two", "once upon a", "a lighthouse")
N_RESPONSES, MAX_NEW = 4, 12


@pytest.fixture(scope="session")
def process_group():
    """One gloo process (verl would build "cpu:gloo,cpu:gloo", which torch refuses)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def verl_config():
    """``verl_config(model_dir, **rollout)``: see :func:`make_config`."""
    return make_config


@pytest.fixture
def data_proto():
    """``data_proto(sampled, …)``: see :func:`make_data_proto`."""
    return make_data_proto


def make_config(model_dir, **rollout):
    """verl's own default config (``_generated_ppo_trainer.yaml``) for the tiny model on the CPU."""
    import verl
    from omegaconf import OmegaConf, open_dict

    root = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    fsdp = {
        "strategy": "fsdp2",
        "use_torch_compile": False,
        "model_dtype": "fp32",
        "mixed_precision": {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
    }
    overrides = {
        "actor_rollout_ref": {
            "model": {
                "path": str(model_dir),
                "enable_gradient_checkpointing": False,
                "override_config": {"attn_implementation": "sdpa"},  # the default flash_attention_2 is CUDA-only
            },
            "actor": {
                "strategy": "fsdp2",
                "ppo_mini_batch_size": len(PROMPTS),
                "ppo_micro_batch_size_per_gpu": 8,
                "use_torch_compile": False,
                "optim": {"lr": 1e-3},  # a step that 4 samples per prompt can read
                "fsdp_config": fsdp,
            },
            "rollout": {"log_prob_micro_batch_size_per_gpu": 8, "n": N_RESPONSES, **rollout},
        }
    }
    with open_dict(root):
        root = OmegaConf.merge(root, OmegaConf.create(overrides))
    return root


@pytest.fixture
def make_worker(process_group):
    """``make_worker(config)``: verl's ActorRolloutRefWorker (role "actor") with its model loaded."""

    def make(config):
        from verl.workers.engine_workers import ActorRolloutRefWorker

        worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
        worker.init_model()
        return worker

    return make


@pytest.fixture(scope="session")
def sampled(tiny_qwen2_dir):
    """The rollouts of one step: ``N_RESPONSES`` samples per prompt from the tiny model (temperature
    1, up to ``MAX_NEW`` tokens, stopping at EOS), with the sampler's own log-probs: a dict of
    left-padded ``prompts``, right-padded ``responses``, ``response_mask`` (the stop token counted),
    ``rollout_log_probs`` and the ``uid`` of each row's prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    prompts, responses, logq, uid = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    for p, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(N_RESPONSES):
            seq, lq = list(ids), []
            with torch.no_grad():
                for _ in range(MAX_NEW):
                    logits = model(torch.tensor([seq])).logits[0, -1].float()
                    lp = torch.log_softmax(logits, -1)
                    t = int(torch.multinomial(lp.exp(), 1, generator=gen))
                    seq.append(t)
                    lq.append(float(lp[t]))
                    if t == tok.eos_token_id:
                        break
            prompts.append(ids)
            responses.append(seq[len(ids) :])
            logq.append(lq)
            uid.append(f"prompt-{p}")
    P, R = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    out = {
        "prompts": torch.tensor([[pad] * (P - len(x)) + x for x in prompts]),
        "prompt_mask": torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in prompts]),
        "responses": torch.tensor([x + [pad] * (R - len(x)) for x in responses]),
        "response_mask": torch.tensor([[1] * len(x) + [0] * (R - len(x)) for x in responses]),
        "rollout_log_probs": torch.tensor([x + [0.0] * (R - len(x)) for x in logq]),
        "uid": uid,
    }
    return out


def make_data_proto(sampled, *, temperature: float = 1.0, with_q: bool = True):
    """The batch ``RayPPOTrainer.fit`` holds before its old-log-prob pass, as a verl ``DataProto``."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.utils.model import compute_position_id_with_mask

    attention_mask = torch.cat([sampled["prompt_mask"], sampled["response_mask"]], 1)
    tensors = {
        "prompts": sampled["prompts"],
        "responses": sampled["responses"],
        "input_ids": torch.cat([sampled["prompts"], sampled["responses"]], 1),
        "attention_mask": attention_mask,
        "position_ids": compute_position_id_with_mask(attention_mask),
        "response_mask": sampled["response_mask"],
    }
    if with_q:
        tensors["rollout_log_probs"] = sampled["rollout_log_probs"]
    meta = {"temperature": temperature, "global_token_num": attention_mask.sum(-1).tolist()}
    return DataProto.from_dict(
        tensors=tensors, non_tensors={"uid": np.array(sampled["uid"], dtype=object)}, meta_info=meta
    )


@pytest.fixture
def library_headline():
    """``library_headline(lp0, h0, lp1, h1, mask, uid, logq, V)``: ΔH by the library's own
    ``estimate`` / ``estimate_tokens`` (cv, pd, pd_sn) / ``headline`` on verl's per-token arrays."""
    import numpy as np

    from isdelta.estimators import estimate, estimate_tokens, headline

    def of(lp0, h0, lp1, h1, mask, uid, logq, V):
        m = mask.astype(bool)
        lp0, h0, lp1, h1, logq = (np.where(m, x, 0.0) for x in (lp0, h0, lp1, h1, logq))
        group = np.unique(np.asarray(uid), return_inverse=True)[1]
        est = estimate(
            lp0.sum(1), lp1.sum(1), m.sum(1), group, entropy_sum0=h0.sum(1), entropy_sum1=h1.sum(1), log_q=logq.sum(1)
        )
        toks = [estimate_tokens(lp0, lp1, h0, h1, m, group, method=k, token_logq=logq) for k in ("cv", "pd", "pd_sn")]
        return headline(est, *toks, support_size=V)

    return of
