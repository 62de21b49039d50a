"""A CPU platform for verl 0.9.1, registered through verl's own hook (``PlatformRegistry``), so
that its real actor worker (FSDP2 engine) runs on this project's CPU-only CI.

Test infrastructure, not part of isdelta: verl users train on GPUs. Selected with
``VERL_PLATFORM=cpu``; imported before any verl module caches ``get_device_name()``
(``tests/with_verl/conftest.py`` does both). Nothing in verl is modified.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry


class _CpuDeviceModule(types.ModuleType):
    """A ``torch.cuda``-shaped namespace for the CPU.

    verl calls ``get_torch_device().<fn>()`` for memory stats, rng state, empty_cache,
    mem_get_info, ... ``torch.cpu`` only has a subset (current_device, synchronize,
    Stream, Event, ...).  Missing functions are provided here as harmless no-ops;
    everything else is delegated to ``torch.cpu``.
    """

    def __init__(self):
        super().__init__("verl_cpu_device_module")

    def __getattr__(self, name):  # only called when normal lookup fails
        return getattr(torch.cpu, name)

    # --- device -------------------------------------------------------------
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device) -> None:
        return None

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    # --- memory -------------------------------------------------------------
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device=None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device=None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device=None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def mem_get_info(device=None):
        try:
            import psutil

            vm = psutil.virtual_memory()
            return vm.available, vm.total
        except Exception:
            return 0, 0

    @staticmethod
    def set_per_process_memory_fraction(fraction, device=None) -> None:
        return None

    # --- rng ----------------------------------------------------------------
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None) -> None:
        torch.set_rng_state(state)


_CPU_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl platform backend for plain CPU (single or multi process, gloo)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _CPU_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # never auto-detected; only selected explicitly via VERL_PLATFORM=cpu
        return False

    def current_device(self):
        # verl uses get_device_id() as a device spec: tensor.to(...), torch.device(...),
        # FSDP(device_id=...).  "cpu" works for all of them (an int would mean an
        # accelerator index, which fails on a CPU-only torch).
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # A variable nobody else uses, so Worker env plumbing is harmless.
        return "VERL_CPU_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_cpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
