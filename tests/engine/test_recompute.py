"""Recomputation under autograd (EngineConfig.recompute): same gradients, memory bounded by a chunk."""

from __future__ import annotations

import pytest
import torch

from isdelta.engine import EngineConfig, LogitTransform, LogProbEngine
from isdelta.engine.recompute import checkpointed_layers
from tests.engine.test_logprob import random_rollouts, sampled_rollouts


def _grads(model, ro, recompute: bool, transform=LogitTransform(), chunk_elems=2**23):
    """Gradient of a loss on every output the engine has (log p, entropy, varentropy, stop share)."""
    cfg = EngineConfig.from_transform(
        transform, requires_grad=True, recompute=recompute, progress=False, chunk_elems=chunk_elems
    )
    s = LogProbEngine(cfg).score(model, ro)
    loss = s.logp.sum() + 0.3 * s.entropy_sum.sum() - 0.1 * s.token_varentropy.sum() + s.stop_entropy_sum.sum()
    model.zero_grad()
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return s, g


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(temperature=0.7, top_k=20, top_p=0.9)])
def test_recomputed_scores_and_gradients_equal_the_kept_graph(arch, transform, request, rng):
    model = request.getfixturevalue(arch)
    _, _, ro = sampled_rollouts(model, transform)
    s0, g0 = _grads(model, ro, recompute=False, transform=transform, chunk_elems=96 * 5)
    s1, g1 = _grads(model, ro, recompute=True, transform=transform, chunk_elems=96 * 5)  # several chunks
    for name in ("token_logp", "token_entropy", "token_varentropy"):
        torch.testing.assert_close(getattr(s1, name).detach(), getattr(s0, name).detach(), rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:  # the same operations on the same inputs: equal up to the order of accumulation
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def _saved_shapes(model, ro, recompute: bool) -> list[tuple[int, ...]]:
    """Shapes of the tensors (parameters aside) autograd saves for the backward of a score."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = LogProbEngine(requires_grad=True, recompute=recompute, progress=False, chunk_elems=96 * 4).score(model, ro)
    del s
    return shapes


def test_recompute_keeps_no_logits_and_no_layer_activations(tiny_llama, rng):
    _, _, ro = random_rollouts(rng, P=4, G=4, max_comp=7)
    V, FF = 96, 64  # the tiny Llama's vocabulary and MLP width: no other dimension has these sizes
    kept, rec = _saved_shapes(tiny_llama, ro, recompute=False), _saved_shapes(tiny_llama, ro, recompute=True)
    # kept graph: the head's [m, V] buffers of every chunk and every layer's MLP activations
    assert sum(V in s for s in kept) > 20 and sum(FF in s for s in kept) >= 4
    # recomputed: the chunks' hidden states and the layers' inputs; nothing of size V or FF
    assert not any(V in s or FF in s for s in rec), [s for s in rec if V in s or FF in s]
    assert len(rec) < len(kept) / 3


def test_layers_are_restored_after_the_call_and_after_an_error(tiny_llama, rng):
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in tiny_llama.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2
    with checkpointed_layers(tiny_llama) as n:
        assert n == 2 and all("forward" in vars(m) for m in layers)
    assert not any("forward" in vars(m) for m in layers)
    with pytest.raises(RuntimeError, match="boom"), checkpointed_layers(tiny_llama):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in layers)
    with checkpointed_layers(tiny_llama, enabled=False) as n:
        assert n == 0 and not any("forward" in vars(m) for m in layers)
    # the model still runs and trains as before, in either mode
    _, _, ro = random_rollouts(rng, P=1, G=2)
    assert tiny_llama.training is False
    LogProbEngine(requires_grad=True, progress=False).score(tiny_llama, ro).logp.sum().backward()
    tiny_llama.zero_grad()
