"""Experts for the CPU engine: warm ones copied into RAM once, cold ones read from the file map."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from moe_tier.moe import ExpertWeights
from moe_tier.reader import ExpertId, ExpertRef, ModelDesc
from moe_tier.stats import EngineStats
from moe_tier.tensors import QTensor


def blob_layout(ref: ExpertRef) -> dict[str, int]:
    """Byte offset of each part (by matrix name) in the expert's blob: its parts back to back in ExpertRef order,
    the layout of a warm blob and of a GPU slot alike, so moving an expert is one copy."""
    offsets, at = {}, 0
    for p in ref.parts:
        offsets[p.matrix] = at
        at += p.n_bytes
    return offsets


def blob_weights(ref: ExpertRef, blob: np.ndarray) -> ExpertWeights:
    """The expert's matrices as QTensors over its blob, for the CPU kernels."""
    layout = blob_layout(ref)
    parts = {p.matrix: QTensor.over(p.tensor, blob[layout[p.matrix] : layout[p.matrix] + p.n_bytes], p.qtype, p.shape)
             for p in ref.parts}
    return ExpertWeights(parts["gate"], parts["up"], parts["down"])


class HostExperts:
    """Warm experts are one contiguous RAM blob each (one copy moves it); cold ones stay in the map."""

    def __init__(self, desc: ModelDesc, warm: Iterable[ExpertId], stats: EngineStats):
        self.desc = desc
        self.stats = stats
        self.warm = {eid: self._copy(eid) for eid in warm}

    def _copy(self, eid: ExpertId) -> ExpertWeights:
        ref = self.desc.experts[eid]
        blob = np.concatenate([self.desc.data(p.offset, p.n_bytes) for p in ref.parts])
        return blob_weights(ref, blob)

    def expert(self, eid: ExpertId) -> ExpertWeights:
        ref = self.desc.experts[eid]
        if eid in self.warm:
            self.stats.served("warm", ref.n_bytes)
            return self.warm[eid]
        self.stats.served("cold", ref.n_bytes)
        parts = {p.matrix: QTensor.over(p.tensor, self.desc.data(p.offset, p.n_bytes), p.qtype, p.shape)
                 for p in ref.parts}
        return ExpertWeights(parts["gate"], parts["up"], parts["down"])
