"""What the monitor reads from the model and puts back: its stop ids, and every piece of state a
forward pass could disturb (train/eval modes, ``requires_grad``, ``.grad``, the RNG), so that
monitoring never changes what the training loop does next."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["default_eos", "default_pad", "free_memory", "preserved"]


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Restore per-module train/eval modes, requires_grad flags, .grad tensors and RNG state."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # fork_rng saves and restores the CPU generator, and these CUDA devices' (only where CUDA is
    # already initialised: touching it would create a context on every GPU)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag, g in zip(params, flags, grads):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if p.grad is not g:
                    p.grad = g


def default_eos(model: torch.nn.Module) -> int | list[int] | None:
    """The model's stop ids: generation_config first (it may list several), else config."""
    inner = getattr(model, "module", model)
    for cfg in (getattr(inner, "generation_config", None), getattr(inner, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


def default_pad(model: torch.nn.Module) -> int | None:
    """The model's pad id: config first, else generation_config; None when neither has one."""
    inner = getattr(model, "module", model)
    for cfg in (getattr(inner, "config", None), getattr(inner, "generation_config", None)):
        pad = getattr(cfg, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
            return pad
    return None


def free_memory(exc: BaseException) -> None:
    """After an out-of-memory error, hand cached blocks back so the training step can go on."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
