"""Parameters as vectors: the update's direction d = θ1 − θ0, snapshots of θ, and checks that
a direction fits a model (the probes move a model along d and put it back bit for bit)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "Direction",
    "ParamSource",
    "check_direction",
    "parameter_delta",
    "restore_parameters",
    "snapshot_parameters",
]

Direction = Mapping[str, torch.Tensor]
ParamSource = torch.nn.Module | Mapping[str, torch.Tensor]


def _named(source: ParamSource, arg: str) -> dict[str, torch.Tensor]:
    """name → tensor of a model's parameters (tied weights once) or of a parameter mapping."""
    if isinstance(source, torch.nn.Module):
        return {n: p for n, p in source.named_parameters()}
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(
        f"{arg} must be a torch.nn.Module or a mapping name → tensor (as from "
        f"snapshot_parameters); got {type(source).__name__}."
    )


def _check_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: tuple[str, str]) -> None:
    """Raise ValueError unless both hold the same parameter names with the same shapes."""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = [f"{n}: {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if n in b and a[n].shape != b[n].shape]
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) of {names[0]} missing from {names[1]} (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} parameter(s) of {names[1]} not in {names[0]} (e.g. {extra[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:3]})")
    raise ValueError(
        f"{names[0]} and {names[1]} are not the same architecture: " + "; ".join(parts) + ". "
        "A parameter difference needs two checkpoints of one architecture (same parameter names "
        "and shapes); load both with the same model class and config."
    )


def parameter_delta(
    model0: ParamSource, model1: ParamSource, *, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """d = θ1 − θ0 for every parameter, after checking both have one architecture.

    Parameters
    ----------
    model0, model1 : torch.nn.Module or mapping name → tensor
        The models before and after the update, or parameter snapshots of them
        (:func:`snapshot_parameters`), keyed by ``named_parameters()`` names (tied weights once).
    device : torch.device or str, optional
        Where the differences live. Default: the device of model1's parameter (one more copy
        of the model there; pass "cpu" to keep accelerator memory free).

    Returns
    -------
    dict name → Tensor
        θ1 − θ0 computed and stored in float32 (or float64 when a parameter is float64), so a
        bfloat16 model's small update is not rounded away.

    Raises
    ------
    ValueError
        Different parameter names or shapes (the message lists them).
    """
    p0, p1 = _named(model0, "model0"), _named(model1, "model1")
    _check_same_layout(p0, p1, ("model0", "model1"))
    out = {}
    with torch.no_grad():
        for name, b in p1.items():
            dtype = torch.promote_types(torch.promote_types(b.dtype, p0[name].dtype), torch.float32)
            dev = b.device if device is None else torch.device(device)
            out[name] = b.detach().to(dev, dtype) - p0[name].detach().to(dev, dtype)
    return out


def snapshot_parameters(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters (all, or ``names``), exact, for parameter_delta / restore."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in (names or params)}


def restore_parameters(model: torch.nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Copy a snapshot back into the model's parameters in place (bit for bit)."""
    params = check_direction(model, snapshot)  # same names and shapes, or a clear error
    with torch.no_grad():
        for n, t in snapshot.items():
            params[n].copy_(t)


def check_direction(model: torch.nn.Module, direction: Direction) -> dict[str, torch.nn.Parameter]:
    """The model's parameters named in ``direction`` (shapes checked); raises on a mismatch."""
    if not isinstance(direction, Mapping) or not direction:
        raise TypeError(
            "direction must be a non-empty mapping name → tensor, θ1 − θ0 (as from "
            f"parameter_delta); got {type(direction).__name__}."
        )
    params = dict(model.named_parameters())
    unknown = sorted(set(direction) - set(params))
    if unknown:
        raise ValueError(
            f"direction names {len(unknown)} parameter(s) the model lacks (e.g. "
            f"{unknown[:3]}): it was made from a different architecture. Build it with "
            "parameter_delta(model0, model1) from checkpoints of this model."
        )
    _check_same_layout({n: params[n] for n in direction}, direction, ("model", "direction"))
    return {n: params[n] for n in direction}
