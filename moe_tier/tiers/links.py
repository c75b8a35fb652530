"""Link speeds measured at start-up, and the cost model that decides, per missing expert, fetch or CPU.

Nothing here is a machine constant: each rate is timed on this machine when the tiers open.
  h2d_bytes_per_s   pinned host -> GPU copy
  disk_bytes_per_s  O_DIRECT reads of expert ranges of the model file
  cpu_bytes_per_s   expert weight bytes the CPU kernels stream through for one token
  host_bytes_per_s  what host memory serves when the link and the CPU read it at once (they share it), timed
                    side by side where decode splits staged experts between them (cpu_share.side_by_side)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from moe_tier.moe import swiglu_ffn
from moe_tier.reader import ExpertId
from moe_tier.tiers.slots import Tier

DISK_SAMPLE_BYTES = 256 << 20
H2D_SAMPLE_BYTES = 256 << 20
CPU_SAMPLE_BYTES = 512 << 20  # experts' bytes timed on the CPU: past any last-level cache
MIN_SHARE = 0.1  # the least CPU share of a staged expert worth splitting it for (balanced_share)


@dataclass(frozen=True)
class LinkSpeeds:
    h2d_bytes_per_s: float
    disk_bytes_per_s: float
    cpu_bytes_per_s: float
    host_bytes_per_s: float | None = None

    def as_gb_per_s(self) -> dict[str, float]:
        return {k.removesuffix("_bytes_per_s") + "_GB/s": v / 1e9 for k, v in vars(self).items() if v is not None}


def balanced_share(cpu_bytes_per_s: float, link_bytes_per_s: float) -> float:
    """The CPU's fraction of a staged expert's bytes at which it and the link finish together; 0 (no share) under
    MIN_SHARE: a CPU that slow is usually a busy one, and numba's parallel regions then stall on threads that are
    not scheduled (an H200 host compiling on half its cores measured 3.9 GB/s; a 4% share cut decode from 62.8 to
    25.2 tokens/s)."""
    share = cpu_bytes_per_s / (cpu_bytes_per_s + link_bytes_per_s)
    return share if share >= MIN_SHARE else 0.0


@dataclass(frozen=True)
class Miss:
    eid: ExpertId
    n_bytes: int
    tier: Tier  # WARM or COLD
    n_tokens: int  # tokens of this step that chose it


@dataclass(frozen=True)
class Decision:
    fetch: tuple[Miss, ...]  # copied into a GPU slot, then computed there
    cpu: tuple[Miss, ...]  # computed on the CPU where it lies


def decide(misses: Sequence[Miss], speeds: LinkSpeeds, can_fetch: int) -> Decision:
    """Greedy earliest finish: each miss, largest first, goes where it would complete soonest.

    A fetch queues on the host-to-GPU link (after a disk read if cold; GPU compute time is negligible
    next to the copy). CPU work queues on the CPU and scales with tokens, since the kernels stream the
    weights once per token row block. At most can_fetch misses may take a slot (free or evictable).
    """
    link_s = cpu_s = 0.0
    fetch, cpu = [], []
    for m in sorted(misses, key=lambda m: -m.n_bytes * m.n_tokens):
        read_s = m.n_bytes / speeds.disk_bytes_per_s if m.tier is Tier.COLD else 0.0
        via_gpu = link_s + read_s + m.n_bytes / speeds.h2d_bytes_per_s
        via_cpu = cpu_s + read_s + m.n_bytes * m.n_tokens / speeds.cpu_bytes_per_s
        if len(fetch) < can_fetch and via_gpu <= via_cpu:
            fetch.append(m)
            link_s = via_gpu
        else:
            cpu.append(m)
            cpu_s = via_cpu
    return Decision(tuple(fetch), tuple(cpu))


def _median_rate(n_bytes: int, run: Callable[[], float], repeats: int) -> float:
    """run() returns seconds for one pass over n_bytes; the median of several passes."""
    return n_bytes / float(np.median([max(run(), 1e-9) for _ in range(repeats)]))


def measure_h2d(device, n_bytes: int = H2D_SAMPLE_BYTES, repeats: int = 5) -> float:
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    src.numpy()[:] = 1  # touch the pages: a first-touch fault is not the link
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()  # start-up measurement: waiting on this one event is the point
        return start.elapsed_time(end) / 1e3

    once()
    return _median_rate(n_bytes, once, repeats)


def measure_disk(reader, ranges: Sequence[tuple[int, int]], repeats: int = 3) -> float:
    """Read expert ranges (up to DISK_SAMPLE_BYTES) through the cold reader; O_DIRECT keeps it off the cache."""
    sample, total = [], 0
    for off, n in ranges:
        if total + n > DISK_SAMPLE_BYTES and sample:
            break
        sample.append((off, n))
        total += n
    staging = np.empty(reader.staging_bytes(sample), dtype=np.uint8)

    def once() -> float:
        t0 = time.perf_counter()
        reader.read(sample, staging)
        return time.perf_counter() - t0

    return _median_rate(total, once, repeats)


def measure_cpu(experts: Sequence, n_embd: int, repeats: int = 5) -> float:
    """One token through each expert's SwiGLU in turn on the CPU kernels (numba), after a warm-up pass that
    compiles. Several experts, so that the last-level cache cannot serve the repeats: one 94 MiB expert run again
    and again measured 51 GB/s on the H100 host (its L3 holds most of it), sixteen in turn 20 GB/s
    (bench/host_links.py)."""
    x = np.random.default_rng(0).standard_normal((1, n_embd)).astype(np.float32)
    n_bytes = sum(t.data.nbytes for e in experts for t in (e.gate, e.up, e.down))

    def once() -> float:
        t0 = time.perf_counter()
        for e in experts:
            swiglu_ffn(x, e.gate, e.up, e.down)
        return time.perf_counter() - t0

    once()
    return _median_rate(n_bytes, once, repeats)
