"""The cold tier: expert byte ranges read from the GGUF file by a small thread pool, bypassing the page cache.

O_DIRECT keeps the kernel's page cache from silently becoming an unmanaged warm tier (and from measuring RAM
when we mean disk). It needs aligned file offsets, lengths and buffer addresses, so each range is widened to
ALIGN_BYTES and read into the caller's staging buffer; the range's own bytes start a few bytes in.
Where the filesystem refuses O_DIRECT (tmpfs), reads are buffered and the pages dropped after each read.

Staging buffers are plain uint8 numpy arrays: with CUDA they are views of pinned memory, so the copy to a GPU
slot that follows is a true asynchronous DMA.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_tier.errors import MoeTierError

ALIGN_BYTES = 4096  # covers every NVMe/ext4/xfs logical block size
CHUNK_BYTES = 4 << 20  # one pool task: large enough to stream, small enough to spread one expert over threads


def _align_down(n: int) -> int:
    return n // ALIGN_BYTES * ALIGN_BYTES


def _align_up(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class Span:
    """Where one requested byte range landed in a staging buffer."""

    start: int
    n_bytes: int


class ColdRead:
    """An in-flight read of several ranges; wait() returns their spans once every chunk has arrived."""

    def __init__(self, spans: list[Span], futures: list[Future]):
        self.spans = spans
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> list[Span]:
        for f in self.futures:
            f.result()  # re-raises a reader thread's error here
        return self.spans


class ColdReader:
    def __init__(self, path: str | Path, n_threads: int = 4, try_direct: bool = True):
        self.path = Path(path)
        self.fd, self.direct = _open(self.path, try_direct)
        self.file_bytes = os.fstat(self.fd).st_size
        self.pool = ThreadPoolExecutor(n_threads, thread_name_prefix="moe-tier-cold")

    @staticmethod
    def staging_bytes(ranges: Sequence[tuple[int, int]]) -> int:
        """Staging a read of these (offset, n_bytes) ranges needs: aligned spans plus room to align the base."""
        return ALIGN_BYTES + sum(_align_up(off + n) - _align_down(off) for off, n in ranges)

    def submit(self, ranges: Sequence[tuple[int, int]], staging: np.ndarray) -> ColdRead:
        """Start reading (offset, n_bytes) ranges of the file into staging, chunk by chunk on the pool."""
        if staging.dtype != np.uint8 or staging.ndim != 1:
            raise ValueError("staging must be a 1-D uint8 array")
        if staging.size < self.staging_bytes(ranges):
            raise ValueError(f"staging of {staging.size} bytes is too small for {self.staging_bytes(ranges)}")
        pos = (-staging.ctypes.data) % ALIGN_BYTES
        spans, futures = [], []
        for off, n in ranges:
            if off < 0 or off + n > self.file_bytes:
                raise MoeTierError(self.path, f"byte range {off}+{n} lies outside the file ({self.file_bytes:,} bytes)")
            lo, hi = _align_down(off), _align_up(off + n)
            spans.append(Span(pos + off - lo, n))
            need_end = off + n
            for c in range(lo, hi, CHUNK_BYTES):
                c_end = min(c + CHUNK_BYTES, hi)
                view = staging[pos + c - lo : pos + c_end - lo]
                futures.append(self.pool.submit(self._read_chunk, view, c, min(c_end, need_end) - c))
            pos += hi - lo
        return ColdRead(spans, futures)

    def read(self, ranges: Sequence[tuple[int, int]], staging: np.ndarray) -> list[Span]:
        return self.submit(ranges, staging).wait()

    def _read_chunk(self, view: np.ndarray, file_offset: int, need: int) -> None:
        """Fill view from file_offset; at least `need` bytes must arrive (the file may end inside the span)."""
        got, mv = 0, memoryview(view)
        while got < need:
            n = os.preadv(self.fd, [mv[got:]], file_offset + got)
            if n == 0:
                raise MoeTierError(self.path, f"file ended at byte {file_offset + got:,} inside an expert")
            got += n
        if not self.direct:
            os.posix_fadvise(self.fd, file_offset, got, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)


def _open(path: Path, try_direct: bool) -> tuple[int, bool]:
    """(fd, whether reads bypass the page cache)."""
    direct = try_direct and hasattr(os, "O_DIRECT")
    try:
        return os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0)), direct
    except OSError as err:
        if err.errno != errno.EINVAL or not direct:
            raise MoeTierError(path, f"cannot open: {err.strerror}") from None
    return _open(path, False)  # the filesystem refuses O_DIRECT
