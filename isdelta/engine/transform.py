"""The sampling transform: temperature, then top-k, then top-p (HF's warper order).

One object describes how p0 was sampled and how both models are scored, so the sampler and the
engine can never disagree (an HF ``generation_config`` default such as ``top_k=50`` leaking into
sampling but not into scoring biases every importance weight).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["LogitTransform"]


@dataclass(frozen=True)
class LogitTransform:
    """Logit processing that defines the sampling distribution.

    Attributes
    ----------
    temperature : float
        Logits are divided by it (> 0).
    top_k : int or None
        Keep the k largest logits (ties at the k-th value are kept, as in HF); None or 0: off.
    top_p : float
        Keep the smallest set of tokens whose mass reaches ``top_p`` (HF's rule: sort ascending,
        drop the tokens whose cumulative mass is <= 1 - top_p, always keep the top token);
        1.0: off.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0; got {self.temperature}. (Greedy decoding has "
                "no sampling distribution to estimate an entropy of.)"
            )
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None; got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}.")

    @property
    def truncates(self) -> bool:
        """Whether some tokens can get probability exactly 0 (log-prob −inf)."""
        return bool(self.top_k) or self.top_p < 1.0

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and not self.truncates

    def generate_kwargs(self) -> dict:
        """Explicit ``generate`` arguments for this transform (overrides generation_config defaults)."""
        return {
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_k": int(self.top_k or 0),
            "top_p": float(self.top_p),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [M, V] (−inf outside the kept set); same ops as HF's warpers.

        Naive equivalent: ``TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None,
        TemperatureLogitsWarper(t)(None, logits)))``.
        """
        if self.temperature != 1.0:
            logits = logits / self.temperature
        V = logits.shape[-1]
        if self.top_k and self.top_k < V:
            kth = torch.topk(logits, int(self.top_k), dim=-1).values[..., -1:]  # [M, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # [M, V]
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cum <= (1 - self.top_p)
            drop_sorted[..., -1:] = False  # always keep the top token
            drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits
