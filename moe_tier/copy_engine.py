"""Copies from pinned host memory into VRAM by a GPU's copy engines, queued by the host on a stream of their own.

The CPU share (cpu_share.py) has the copy engine stage the GPU's part of each warm expert a decode step chose
(three contiguous ranges) while the CPU computes the rest: every microsecond the host spends queuing them delays
its own part. torch's copy_ of a pinned view costs ~30 us a range (views, the pinned allocator's bookkeeping, an
event); cudaMemcpyAsync through ctypes, from the CUDA runtime torch loaded, a few.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

import torch

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the (unified) addresses


@cache
def _runtime() -> ctypes.CDLL:
    """The libcudart this process loaded for torch (one runtime, one context per GPU), else one found by name."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart" in line}
    path = next((p for p in sorted(paths) if os.path.basename(p).startswith("libcudart.so")), None)
    path = path or ctypes.util.find_library("cudart")
    if path is None:
        raise OSError("no CUDA runtime library (libcudart) found")
    lib = ctypes.CDLL(path)
    lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.cudaMemcpyAsync.restype = ctypes.c_int
    return lib


class CopyEngine:
    """One GPU's host-to-device copies, in order on one stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"  # else Triton's interpreter (tests): host memory on both sides
        self.stream = torch.cuda.Stream(device) if self.on_gpu else None
        self._copy = _runtime().cudaMemcpyAsync if self.on_gpu else None

    def copy(self, pieces: list[tuple[int, int, int]]) -> None:
        """Queue each (destination address, source address, bytes), in order."""
        if not self.on_gpu:
            for dst, src, n in pieces:
                ctypes.memmove(dst, src, n)
            return
        with torch.cuda.device(self.device):  # the stream's GPU must be the current one
            for dst, src, n in pieces:
                if err := self._copy(dst, src, n, MEMCPY_DEFAULT, self.stream.cuda_stream):
                    raise RuntimeError(f"cudaMemcpyAsync to GPU {self.device.index} failed (CUDA error {err})")
