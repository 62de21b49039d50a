"""The sampling transform: temperature, then top-k, then top-p (HF's warper order).

One object describes how p0 was sampled and how both models are scored, so the sampler and the
engine can never disagree (an HF ``generation_config`` default such as ``top_k=50`` leaking into
sampling but not into scoring biases every importance weight).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import torch

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "LogitTransform", "is_integer"]

# The temperatures at which the engine's float32 statistics still describe the model. Measured on
# SmolLM2-135M (128 positions of the score demo, V = 49152, logits |z| <= 40, per-position std 3.1),
# float32 statistics against float64 ones of the same logits:
# - small T: the logits' own float32 rounding (2^-24·|z|, ~2e-6 at |z| = 40) becomes a log-prob
#   error of 2^-24·|z|/T: 2e-4 nats per token at T = 0.01, 2 nats at T = 1e-6, where near-ties
#   are decided by rounding; at T = 1e-300 logits / T overflows to inf and every statistic is NaN.
#   vLLM raises any temperature below 0.01 to 0.01 (with a log line), so it could not sample below it.
# - large T: the tempered distribution approaches uniform, ln V − H ≈ Var(z) / (2T²): 5e-4 nats at
#   T = 100, 5e-6 at T = 1000, where float32's own error on H (1e-5 nats, measured) exceeds it and
#   H is ln V up to rounding noise.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
_F32_MAX = float(torch.finfo(torch.float32).max)
_VAR_Z = 10.0  # SmolLM2's per-position variance of the logits (std 3.1), for the message


@dataclass(frozen=True)
class LogitTransform:
    """Logit processing that defines the sampling distribution.

    Attributes
    ----------
    temperature : float
        Logits are divided by it; within [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``] = [0.01, 100]
        (see there for why).
    top_k : int or None
        Keep the k largest logits (ties at the k-th value are kept, as in HF); None or 0: off.
    top_p : float
        Keep the smallest set of tokens whose mass reaches ``top_p`` (HF's rule: sort ascending,
        drop the tokens whose cumulative mass is <= 1 - top_p, always keep the top token);
        1.0: off. In (0, 1].
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)
        _check_top_p(self.top_p)

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


# ---------------------------------------------------------------------------- checks
def _check_temperature(t) -> None:
    """ValueError unless ``t`` is a real number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t):
        raise ValueError(f"temperature must be a finite number; got {t!r}.")
    if not t > 0:
        raise ValueError(
            f"temperature must be > 0; got {t}. (Greedy decoding has no sampling distribution to estimate an "
            f"entropy of; the smallest temperature isdelta scores is {MIN_TEMPERATURE:g}.)"
        )
    if t < MIN_TEMPERATURE:
        overflow = _F32_MAX * t  # logits above it overflow float32 once divided by t
        why = (
            f"logits / T overflows float32 for every logit above {overflow:.2g}, and every statistic is NaN"
            if overflow < 1e4
            else f"the float32 rounding of the logits (~2e-6 at |z| = 40) becomes an error of {2e-6 / t:.2g} nats per "
            "token in log p"
        ) + f"; vLLM raises any temperature below {MIN_TEMPERATURE:g} to {MIN_TEMPERATURE:g}"
    elif t > MAX_TEMPERATURE:
        why = (
            f"above {MAX_TEMPERATURE:g} the tempered distribution nears uniform: ln V − H ≈ Var(z) / 2T² is "
            f"{_VAR_Z / (2 * t * t):.2g} nats at T = {t:g} for SmolLM2's logits, and below float32's error on the "
            "entropy (~1e-5 nats) by T = 1000, where every text and model reads ln V"
        )
    else:
        return
    raise ValueError(
        f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]; got {t:g}: {why}. "
        f"Use a temperature in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (1: the model's own distribution)."
    )


def is_integer(v) -> bool:
    """Whether ``v`` is a whole number: an int (numpy's too), or a finite float equal to one; not a bool."""
    if isinstance(v, bool):
        return False
    return isinstance(v, Integral) or (isinstance(v, Real) and math.isfinite(v) and int(v) == v)


def _check_top_k(k) -> None:
    """ValueError unless ``k`` is None or a non-negative integer (float ``inf``/``nan`` included)."""
    if k is None:
        return
    if not is_integer(k) or k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 or None: off) or None; got {k!r}.")


def _check_top_p(p) -> None:
    """ValueError unless ``p`` is a real number in (0, 1]."""
    if isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1:
        raise ValueError(
            f"top_p must lie in (0, 1]; got {p!r}. (1 keeps every token; a small top_p keeps the most likely one.)"
        )
