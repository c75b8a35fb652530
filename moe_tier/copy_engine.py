"""Copies from pinned host memory into VRAM by a GPU's copy engines, queued by the host on a stream of their own.

The CPU share (cpu_share.py) stages the GPU's part of each warm expert a decode step chose: ranges of gate's and
up's rows and a column range of every row of down. A kernel copying it (kernels/gpu_moe_decode.stage) holds SMs
that the matrix-vector products beside it need (at 24 GiB those took 4.6-6.4 ms a token instead of 2.7 with every
expert hot); the copy engines hold none. torch's copy_ of a strided host view gathers it on the CPU first, hence
cudaMemcpy2DAsync through ctypes, from the CUDA runtime torch loaded.
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
    lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.cudaMemcpy2DAsync.restype = ctypes.c_int
    return lib


class CopyEngine:
    """One GPU's host-to-device copies, in order on one stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"  # else Triton's interpreter (tests): host memory on both sides
        self.stream = torch.cuda.Stream(device) if self.on_gpu else None
        self._copy = _runtime().cudaMemcpy2DAsync if self.on_gpu else None

    def copy(self, dst: int, src: int, rows: int, width: int, pitch: int = 0) -> None:
        """rows pieces of width bytes, pitch bytes apart on both sides (one piece: a contiguous range)."""
        if not self.on_gpu:
            for r in range(rows):
                ctypes.memmove(dst + r * pitch, src + r * pitch, width)
            return
        with torch.cuda.device(self.device):  # the stream's GPU must be the current one
            err = self._copy(dst, pitch or width, src, pitch or width, width, rows, MEMCPY_DEFAULT,
                             self.stream.cuda_stream)
        if err:
            raise RuntimeError(f"cudaMemcpy2DAsync to GPU {self.device.index} failed (CUDA error {err})")
