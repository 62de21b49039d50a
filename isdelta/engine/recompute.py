"""Memory bounded by a chunk under autograd: recompute instead of keeping (``EngineConfig.recompute``).

A score with a graph (the update's loss, the probe's gradient) keeps, until its backward, what
every operation saved. Left alone that is, per micro-batch of M counted tokens::

    the LM-head chunks   ~5 · M · V · 4 bytes   (logits, log_softmax, p, the centred deviations)
    the body             ~L · M · a · 4 bytes   (every layer's activations, a ≈ 8·D + 4·D_ff)

On SmolLM2 (V = 49,152, L = 30, a ≈ 10k) at 5,000 tokens that is ~5 GB of head buffers and
~6 GB of body activations: the ~11 GB peak of the first demo. At V = 262,144 the head alone
would be 26 GB. With recomputation the forward keeps only

    each head chunk's hidden states [m, D]       and      each decoder layer's input [M, D]

and the backward recomputes one chunk or one layer at a time from them: the peak is one chunk's
[m, V] buffers (``chunk_elems``) plus one layer's activations, whatever M is. The price is one
more forward of the body and the head during the backward (measured in ``benchmarks/bench_memory.py``).

The layers are the model's own ``GradientCheckpointingLayer`` blocks (every transformers decoder
layer), recomputed by ``torch.utils.checkpoint`` (non-reentrant): wrapped for the call only,
whatever mode the model is in (HF's own switch acts only in train mode, and the engine scores in
eval mode so that dropout is off), and restored afterwards. The LM head goes through
:class:`_HeadStats`, which also adds each chunk's share of the head's [V, D] gradient into one
buffer in place. The values are the same as without recomputation: the same operations on the
same inputs, run again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_layers", "head_stats", "recomputed"]


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no layer to wrap, the head chunks still are
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Recompute each decoder layer of ``model`` in the backward instead of keeping its activations.

    Yields the number of layers wrapped (0 when ``enabled`` is False or the model has none). Each
    layer's ``forward`` is replaced by a checkpointed call of itself for the duration only; a
    layer the caller already wrapped the same way is left as it is.
    """
    wrapped = []
    if enabled:
        for layer in _layers(model):
            if "forward" in vars(layer):  # an instance-level forward: someone else's wrapper
                continue
            inner = layer.forward  # the bound class forward (HF's own switch stays off in eval mode)

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
            wrapped.append(layer)
    try:
        yield len(wrapped)
    finally:
        for layer in wrapped:
            del layer.forward


def recomputed(fn, *args):
    """``fn(*args)`` keeping only ``args`` for the backward (which runs ``fn`` again)."""
    return checkpoint(fn, *args, use_reentrant=False)


class _HeadStats(torch.autograd.Function):
    """The four chunk statistics of every row of ``h`` [M, D] through a linear LM head, with a
    backward that recomputes one chunk of logits at a time and adds its share of the head's
    gradient into one [V, D] buffer in place (``addmm_``). Autograd's own accumulation allocates a
    fresh [V, D] gradient per chunk (671 MB at V = 262,144, D = 640) and was measured holding
    many at once (``benchmarks/bench_memory.py``)."""

    @staticmethod
    def forward(ctx, h, weight, bias, step, stats_of, targets, rows, eos):
        ctx.step, ctx.stats_of = step, stats_of
        ctx.save_for_backward(h, weight, bias, targets, rows, eos)
        parts = [
            stats_of(F.linear(h[s : s + step], weight, bias), targets[s : s + step], rows[s : s + step], eos)
            for s in range(0, len(h), step)
        ]
        return tuple(torch.cat(x) for x in zip(*parts))

    @staticmethod
    def backward(ctx, *grads):
        h, weight, bias, targets, rows, eos = ctx.saved_tensors
        step, stats_of = ctx.step, ctx.stats_of
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grads = [torch.zeros(len(h), device=h.device) if g is None else g for g in grads]
        for s in range(0, len(h), step):
            hc = h[s : s + step]
            with torch.enable_grad():
                z = F.linear(hc, weight, bias).requires_grad_(True)  # a leaf: the head's part is done by hand
                stats = stats_of(z, targets[s : s + step], rows[s : s + step], eos)
                (gz,) = torch.autograd.grad(stats, z, [g[s : s + step] for g in grads], allow_unused=True)
            if gz is None:  # these rows' statistics do not reach the loss
                continue
            if need_h:
                grad_h[s : s + step] = gz @ weight.to(gz.dtype)
            if need_w:
                grad_w.addmm_(gz.t().to(acc), hc.to(acc))
            if need_b:
                grad_b += gz.sum(0).to(acc)
            del z, stats, gz
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None, None, None, None


def head_stats(head: torch.nn.Module, h: torch.Tensor, step: int, stats_of, targets, rows, eos):
    """``stats_of(head(h_chunk), targets, rows, eos)`` for every chunk of ``step`` rows of ``h``,
    concatenated: the four statistics [M], with one chunk's memory in the backward.

    ``head`` is the model's LM head; ``stats_of`` maps its raw output [m, V] to the statistics
    (the architecture's final scaling and the transform inside). A linear head (every HF causal LM)
    goes through :class:`_HeadStats`; any other is recomputed chunk by chunk by autograd.
    """
    if not isinstance(head, torch.nn.Linear):
        parts = [
            recomputed(
                lambda hc, *c: stats_of(head(hc), *c), h[s : s + step], targets[s : s + step], rows[s : s + step], eos
            )
            for s in range(0, len(h), step)
        ]
        return tuple(torch.cat(x) for x in zip(*parts))
    return _HeadStats.apply(h, head.weight, head.bias, step, stats_of, targets, rows, eos)
