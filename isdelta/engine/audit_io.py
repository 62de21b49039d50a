"""A trainer's batch read for the audit: its tensors picked from a dict by field name (TRL's keys, or
a mapping), and a batch saved to disk (``.pt`` loaded with ``weights_only=True``, or ``.safetensors``).
Re-exported by :mod:`isdelta.engine.audit`; used by ``isdelta audit FILE``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["FIELDS", "batch_arguments", "load_batch"]

FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "completion_lengths",
    "attention_mask",
    "position_ids",
    "per_token_logps",
    "logits",
    "loss_weights",
)
REQUIRED = FIELDS[:4]
ALIASES = {"old_per_token_logps": "per_token_logps"}  # TRL's name in _prepare_inputs' output


def batch_arguments(tensors: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`audit_batch`'s tensor arguments picked from a trainer's dict (TRL's ``_prepare_inputs``
    output, a saved batch); other keys are ignored.

    Parameters
    ----------
    tensors : mapping of str to Tensor
    names : mapping of str to str, optional
        Field → key for keys named otherwise, e.g. ``{"completion_mask": "response_mask"}``. TRL's
        ``old_per_token_logps`` is read as ``per_token_logps`` without it.
    """
    names = dict(names or {})
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; the fields are {list(FIELDS)}.")
    out: dict[str, Any] = {}
    for field in FIELDS:
        key = names.get(field, field)
        if key not in tensors and field not in names:
            key = next((a for a, f in ALIASES.items() if f == field and a in tensors), key)
        if key in tensors and tensors[key] is not None:
            out[field] = tensors[key]
        elif field in names:
            raise ValueError(f"key {key!r} (for {field}) is not in the batch; its keys are {sorted(tensors)}.")
    missing = [f for f in REQUIRED if f not in out]
    if missing:
        raise ValueError(
            f"the batch lacks {missing}; its keys are {sorted(tensors)}. Map keys named otherwise with "
            "names={field: key} (command line: --key field=key)."
        )
    return out


def load_batch(path: str | Path) -> dict[str, Any]:
    """A saved batch: a dict of tensors in a ``.pt`` file (``torch.load(weights_only=True)``) or a
    ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"{path}: expected a .pt or .safetensors file; got {path.suffix or 'no suffix'!r}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any failure: a truncated zip, garbage bytes, a pickled object of a class
        # `from None`: torch's message advises reloading with weights_only=False, which would run the
        # pickled code of a file that has just failed the safe load; that advice is not passed on.
        raise ValueError(
            f"{path} is not a torch file of plain tensors loadable with weights_only=True (a dict of tensors, "
            "ints, floats and lists saved with torch.save). Save the batch as plain tensors, "
            "torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, path), or as .safetensors."
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors (torch.save(batch, path)).")
    return dict(obj)
