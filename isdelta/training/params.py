"""The trained parameters around a step: θ0, ‖θ1 − θ0‖, the finite checks and the gradient norm."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BLOCK", "ZeroUpdateError", "change_norm", "check_finite", "grad_norm", "reference_params", "sum_sq"]


class ZeroUpdateError(RuntimeError):
    """The update cannot move the model: ΔH would be 0 by construction, not by measurement."""


def reference_params(model, params, reference) -> list[torch.Tensor]:
    """θ0 of each trained parameter: ``reference``'s (checked to match, not copied), else a CPU copy
    (host memory: the device's is not doubled)."""
    if reference is None:
        return [p.detach().to("cpu", copy=True) for p in params]
    ids = {id(p): n for n, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    theta0 = []
    for p in params:
        r = ref.get(ids.get(id(p), ""))
        if r is None or r.shape != p.shape or r is p or r.data_ptr() == p.data_ptr():
            raise ValueError(
                "reference must be an untouched copy of the model being trained (p0: the same parameter "
                "names and shapes, its own storage); pass None to let update() keep a copy of θ0 itself."
            )
        theta0.append(r.detach())
    return theta0


# elements per block of the float64 sums below: 32 MiB of temporaries, whatever a parameter's size
# (a whole-tensor .double() of Gemma-3's [262144, 640] embedding is 1.3 GB, three of them live)
BLOCK = 1 << 22


def sum_sq(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Σ (a − b)² (Σ a² without ``b``) in float64, a block of ``BLOCK`` elements at a time; ``b``
    may live on another device (each block is moved, never the whole tensor)."""
    a = a.detach().reshape(-1)
    b = None if b is None else b.detach().reshape(-1)
    total = 0.0
    for s in range(0, a.numel(), BLOCK):
        x = a[s : s + BLOCK].to(torch.float64, copy=True)
        if b is not None:
            x -= b[s : s + BLOCK].to(x.device, torch.float64)
        total += float(x.square_().sum())
    return total


def change_norm(params, theta0) -> float:
    """‖θ1 − θ0‖₂ in float64, in blocks of each parameter (no flattened or float64 copy)."""
    return sum(sum_sq(p, p0) for p, p0 in zip(params, theta0)) ** 0.5


def check_finite(params, lr: float, grad_norm: float) -> None:
    """FloatingPointError when the step left a parameter NaN or inf (p1 would score as NaN, and
    the engine could only guess at the cause)."""
    bad = sum(1 for p in params if not torch.isfinite(p.detach()).all())
    if bad:
        raise FloatingPointError(
            f"the update made {bad} of {len(params)} trained parameter tensors NaN or inf: lr {lr:g} "
            f"times a gradient of norm {grad_norm:.3g} overflows the weights. Lower lr."
        )


def grad_norm(params) -> float:
    """Global L2 norm of the accumulated gradients; raises ZeroUpdateError when it is 0."""
    sq = sum(sum_sq(p.grad) for p in params if p.grad is not None)
    norm = sq**0.5
    if not np.isfinite(norm):
        half = any(p.dtype == torch.float16 for p in params)
        raise FloatingPointError(
            f"the gradient norm is {norm}: the loss overflowed. Lower lr"
            + (", or use float32/bfloat16 weights instead of float16." if half else ".")
        )
    if norm == 0.0:
        raise ZeroUpdateError(
            "the gradient is exactly zero: no trained parameter influences the counted tokens' "
            "log-probs (all relevant parameters frozen?), so p1 = p0 and ΔH would be 0 by "
            "construction, not by measurement. Unfreeze the parameters to train."
        )
    return norm
