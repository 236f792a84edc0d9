"""Device names as every command takes them: ``auto`` (the GPU of this torchrun rank when there is one, else
the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import os

import torch

from lmforge.errors import ConfigError


def pick_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_KEPT_BYTES = 1 << 30
_allocator_tuned: bool | None = None


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 1 GiB for reuse instead of returning them to the OS.

    By default glibc serves big allocations (a layer's activations, a gathered KV cache) with fresh mmaps and
    unmaps them on free, so every CPU forward page-faults its temporaries in again: on the serving benchmark's
    123M model that is 10-20% of the engine's time (alternated runs, 2 cores). PyTorch's CPU tuning guide
    recommends jemalloc/tcmalloc for the same reason; this gets the effect without preloading a library. The
    cost: the process keeps its peak memory instead of shrinking after it. Process-wide and applied once;
    ``LMFORGE_KEEP_FREED_MEMORY=0`` turns it off; a no-op where malloc is not glibc's. Returns whether it is on.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if os.environ.get("LMFORGE_KEEP_FREED_MEMORY", "1") != "0" and os.name == "posix":
            import ctypes
            import platform

            if platform.libc_ver()[0] == "glibc":
                libc = ctypes.CDLL(None)
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEPT_BYTES)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_BYTES))
    return _allocator_tuned
