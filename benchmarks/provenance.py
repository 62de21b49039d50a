"""What every benchmark records beside its numbers: the commit it measured and the machine."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["commit", "device_name"]


def commit(*paths: str) -> tuple[str, bool]:
    """(short HEAD, whether ``paths`` (the measured code and the script) have uncommitted changes)."""
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT, check=False).stdout
    return run("rev-parse", "--short", "HEAD").strip() or "unknown", bool(run("status", "--porcelain", "--", *paths))


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (``/proc/cpuinfo``)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
