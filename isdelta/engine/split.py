"""A causal LM as the engine runs it: the body (hidden states) and the LM head apart, plus the
final logit scaling some architectures apply after the head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["SplitLM"]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


@dataclass(frozen=True, eq=False)
class SplitLM:
    """An HF causal LM as the engine runs it: body (hidden states) and LM head, apart.

    ``logits(h)`` = the model's own logits for hidden states ``h``: the head plus any final
    scaling the architecture applies (Gemma's soft-cap, Cohere's scale, Granite's divisor),
    upcast to fp32. :meth:`~isdelta.engine.LogProbEngine.check_head` verifies that against
    ``model(...).logits``.

    Attributes
    ----------
    model : the unwrapped model (DDP ``.module`` and ``torch.compile`` wrappers stripped).
    body, head : ``model.base_model`` and ``model.get_output_embeddings()``.
    final : the architecture's final logit scaling (identity for most).
    """

    model: torch.nn.Module
    body: torch.nn.Module
    head: torch.nn.Module
    final: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, model: torch.nn.Module) -> SplitLM:
        """Split ``model`` (wrappers allowed); a model without body and head fails loudly."""
        model = _unwrap(model)
        return cls(model, *_body_and_head(model), _final_logit_fn(model))

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [m, V] of hidden states [m, D]."""
        return self.final(self.head(hidden)).float()


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        raise TypeError(
            f"{type(model).__name__} does not expose a separate body (`base_model`) and LM head "
            "(`get_output_embeddings()`): the engine needs an HF *ForCausalLM model. Load it with "
            "AutoModelForCausalLM (or isdelta.engine.load_model)."
        )
    return body, head


def _final_logit_fn(model: torch.nn.Module):
    """The logit scaling some architectures apply after the LM head (identity for most)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    div = getattr(cfg, "logits_scaling", None)  # Granite

    def fn(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if div is not None:
            logits = logits / div
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return fn
