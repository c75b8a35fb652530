"""What this machine offers, measured rather than assumed: each GPU's free memory, host RAM.

torch is optional: without it (or without CUDA) the machine has no GPUs and moe-tier plans for
the CPU alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int  # measured after this process created its CUDA context

    @property
    def runtime_bytes(self) -> int:
        """Memory we can never use: our CUDA context plus whatever other processes hold."""
        return self.total_bytes - self.free_bytes


@dataclass(frozen=True)
class Machine:
    gpus: tuple[GpuInfo, ...]
    ram_available_bytes: int
    runtime: str  # versions that change memory use: keys the remembered fits


def probe() -> Machine:
    return Machine(_cuda_gpus(), _ram_available_bytes(), _runtime_versions())


def _cuda_gpus() -> tuple[GpuInfo, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(i, torch.cuda.get_device_name(i), int(total), int(free)))
    return tuple(gpus)


def _ram_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _runtime_versions() -> str:
    try:
        import torch

        return f"torch-{torch.__version__}-cuda-{torch.version.cuda}"
    except ImportError:
        return "cpu"
