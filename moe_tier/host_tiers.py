"""Experts for the CPU engine: warm ones copied into RAM once, cold ones read from the file map."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from moe_tier.moe import ExpertWeights
from moe_tier.reader import ExpertId, ExpertPart, ModelDesc
from moe_tier.stats import EngineStats
from moe_tier.tensors import QTensor


def _qtensor(part: ExpertPart, data: np.ndarray) -> QTensor:
    n_cols, n_rows = part.shape[0], int(np.prod(part.shape[1:]))
    return QTensor(part.tensor, data, part.qtype, n_rows, n_cols)


class HostExperts:
    """Warm experts are one contiguous RAM blob each (one copy moves it); cold ones stay in the map."""

    def __init__(self, desc: ModelDesc, warm: Iterable[ExpertId], stats: EngineStats):
        self.desc = desc
        self.stats = stats
        self.warm = {eid: self._copy(eid) for eid in warm}

    def _copy(self, eid: ExpertId) -> ExpertWeights:
        ref = self.desc.experts[eid]
        blob = np.empty(ref.n_bytes, dtype=np.uint8)
        parts, at = {}, 0
        for p in ref.parts:
            blob[at : at + p.n_bytes] = self.desc.data(p.offset, p.n_bytes)
            parts[p.matrix] = _qtensor(p, blob[at : at + p.n_bytes])
            at += p.n_bytes
        return ExpertWeights(parts["gate"], parts["up"], parts["down"])

    def expert(self, eid: ExpertId) -> ExpertWeights:
        ref = self.desc.experts[eid]
        if eid in self.warm:
            self.stats.served("warm", ref.n_bytes)
            return self.warm[eid]
        self.stats.served("cold", ref.n_bytes)
        parts = {p.matrix: _qtensor(p, self.desc.data(p.offset, p.n_bytes)) for p in ref.parts}
        return ExpertWeights(parts["gate"], parts["up"], parts["down"])
