"""Programmatic dependent launch (PDL) for decode's kernels: the next kernel in a stream launches while this one
finishes, instead of after it.

At batch 1 a decode step is a chain of ~15 small launches a layer, and between two of them in a CUDA graph the GPU
idled ~3 us (bench/gpu_step_profile.py: 1.31 ms a step on 8 layers, 0.95 ms of it kernels). On sm_90 and later a
kernel launched with launch_pdl may start once every program of the kernel before it has signalled
(griddepcontrol.launch_dependents); it then waits (griddepcontrol.wait) until that kernel has finished and its
writes are visible. Each of decode's kernels signals and waits first thing (pdl_start), before any load or store,
so ordering is as without PDL, only the launch overlaps: and since every program waits, no kernel can finish
before the one it follows, so the chain stays ordered transitively. Kernels of others (torch's, cuBLAS) never
signal, and one of ours after them starts when they end, as usual.

MOE_TIER_PDL=0 turns it off (for comparisons).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (its writes visible): call before any memory
    access. A no-op without PDL (and in Triton's interpreter, which cannot run these instructions)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@functools.cache
def _enabled(index: int) -> bool:
    return os.environ.get("MOE_TIER_PDL", "1") != "0" and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel that calls pdl_start: PDL on where the device has it."""
    on = device.type == "cuda" and _enabled(device.index if device.index is not None else torch.cuda.current_device())
    return {"PDL": on, "launch_pdl": on}
