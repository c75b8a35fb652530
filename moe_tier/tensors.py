"""Weights as GGUF blocks: a QTensor is a byte view plus its quant type and 2-D shape.

Nothing is dequantized ahead of time; `matmul` hands the blocks to the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from moe_tier import kernels
from moe_tier.errors import MoeTierError
from moe_tier.reader import ModelDesc


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_rows, n_cols) of a GGUF shape (K, N, ...): rows are everything past the first dimension."""
    return int(np.prod(shape[1:])), shape[0]


@dataclass(frozen=True)
class QTensor:
    """N rows of K elements in GGUF blocks (GGUF shape (K, N))."""

    name: str
    data: np.ndarray  # uint8 view into the file, or a copy in a tier
    qtype: GGMLQuantizationType
    n_rows: int
    n_cols: int

    @classmethod
    def over(cls, name: str, data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> QTensor:
        return cls(name, data, qtype, *matrix_dims(shape))

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """x (T, K) -> (T, N): `W @ x` reads as the math does, with tokens in rows."""
        return kernels.matmul(x, self.data, self.qtype, self.n_rows, self.n_cols)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return kernels.get_rows(self.data, self.qtype, self.n_cols, ids)


class Weights:
    """Looks tensors up by GGUF name, so model code uses llama.cpp's names directly."""

    def __init__(self, desc: ModelDesc):
        self.desc = desc
        self._matrices: dict[str, QTensor] = {}
        self._vectors: dict[str, np.ndarray] = {}
        for t in desc.tensors.values():
            if t.qtype not in kernels.SUPPORTED:
                raise MoeTierError(desc.path, f"tensor {t.name}: unsupported quant type {t.qtype.name}")

    def __contains__(self, name: str) -> bool:
        return name in self.desc.tensors

    def matrix(self, name: str) -> QTensor:
        if name not in self._matrices:  # views are cheap but not free: build each once
            t = self.desc.tensors[name]
            self._matrices[name] = QTensor.over(name, self.desc.data(t.offset, t.n_bytes), t.qtype, t.shape)
        return self._matrices[name]

    def vector(self, name: str) -> np.ndarray | None:
        """Norm weights and biases as float32 (cached: they are small and used every step)."""
        if name not in self._vectors:
            if name not in self.desc.tensors:
                return None
            m = self.matrix(name)
            self._vectors[name] = m.rows(np.arange(m.n_rows)).reshape(-1)
        return self._vectors[name]
