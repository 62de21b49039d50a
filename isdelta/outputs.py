"""Leaf helpers for writing results: atomic writes, file checksums, JSON-safe numbers, versions,
the pyplot loader, the user's cache folder.

Imports nothing of isdelta and nothing heavy at import time, so every layer (library and
programs) can use it: the estimators (numpy only) as much as the run and score programs.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "cache_dir", "file_sha256", "finite_or_none", "json_num", "pyplot", "versions"]


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO], Any], *, text: bool = False) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it over ``path``.

    An interrupted run never leaves half a file, and two writers never interleave. ``data`` is
    the text (UTF-8) or bytes, or a function that writes to the open temporary file: binary
    (``np.savez``, ``torch.save``), or text with ``newline=""`` when ``text=True`` (``csv``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(data):
            with open(tmp, "w", newline="", encoding="utf-8") if text else open(tmp, "wb") as f:
                data(f)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir(*parts: str) -> Path:
    """isdelta's folder in the user's cache (``$ISDELTA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/isdelta``, else ``~/.cache/isdelta``), joined with ``parts``; not created."""
    root = os.environ.get("ISDELTA_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "isdelta") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "isdelta")
    return Path(root).joinpath(*parts)


def finite_or_none(x) -> float | None:
    """A JSON-safe float: nan and ±inf (and None) become None."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def json_num(x):
    """A JSON-safe number that keeps infinities: ±inf become "inf"/"-inf", NaN and None become
    None; bools and ints stay what they are (numpy scalars become Python ones)."""
    if x is None:
        return None
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return bool(x)
    if isinstance(x, int) or (hasattr(x, "dtype") and x.dtype.kind in "iu"):
        return int(x)
    x = float(x)
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("isdelta", "torch", "transformers", "numpy", "scipy", "arviz"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (corpora and checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
