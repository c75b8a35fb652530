"""The warm tier: chosen experts in one pinned host arena, allocated once, each expert one contiguous blob.

A blob is the expert's parts (gate, up, down, biases) back to back in ExpertRef order: the same layout a GPU
slot uses, so warm -> hot is one asynchronous copy, and the CPU kernels read the blob's parts in place.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from moe_tier.host_tiers import blob_weights
from moe_tier.moe import ExpertWeights
from moe_tier.reader import ExpertId, ModelDesc
from moe_tier.tiers.cold import ColdReader

BLOB_ALIGN_BYTES = 256  # blob starts: cache-line and DMA friendly


def align_up(n: int, to: int = BLOB_ALIGN_BYTES) -> int:
    return -(-n // to) * to


class PinnedArena:
    """Pinned host memory for the warm experts, filled from the file through the cold reader."""

    def __init__(self, desc: ModelDesc, experts: Iterable[ExpertId], reader: ColdReader, batch_bytes: int = 256 << 20):
        self.desc = desc
        self.offset: dict[ExpertId, int] = {}
        total = 0
        for eid in experts:
            self.offset[eid] = total
            total += align_up(desc.experts[eid].n_bytes)
        self.arena = torch.empty(total, dtype=torch.uint8, pin_memory=True)  # (warm bytes,) the whole tier
        self.host = self.arena.numpy()
        self._fill(reader, batch_bytes)

    def _fill(self, reader: ColdReader, batch_bytes: int) -> None:
        """Read experts in batches of about batch_bytes into one staging buffer, then place each part."""
        pending = list(self.offset)
        staging = np.empty(0, dtype=np.uint8)
        while pending:
            batch, size = [], 0
            while pending and (not batch or size + self.desc.experts[pending[0]].n_bytes <= batch_bytes):
                batch.append(pending.pop(0))
                size += self.desc.experts[batch[-1]].n_bytes
            ranges = [(p.offset, p.n_bytes) for eid in batch for p in self.desc.experts[eid].parts]
            if staging.size < reader.staging_bytes(ranges):
                staging = np.empty(reader.staging_bytes(ranges), dtype=np.uint8)
            spans = iter(reader.read(ranges, staging))
            for eid in batch:
                at = self.offset[eid]
                for p in self.desc.experts[eid].parts:
                    s = next(spans)
                    self.host[at : at + p.n_bytes] = staging[s.start : s.start + s.n_bytes]
                    at += p.n_bytes

    def __contains__(self, eid: ExpertId) -> bool:
        return eid in self.offset

    def blob(self, eid: ExpertId) -> torch.Tensor:
        """The expert's bytes as a pinned uint8 tensor view (source of a one-copy fetch)."""
        at = self.offset[eid]
        return self.arena[at : at + self.desc.experts[eid].n_bytes]

    def weights(self, eid: ExpertId) -> ExpertWeights:
        at = self.offset[eid]
        ref = self.desc.experts[eid]
        return blob_weights(ref, self.host[at : at + ref.n_bytes])
