"""Matmul and row lookup straight from GGUF quantized blocks, matching llama.cpp's CPU backend.

Shape key: T tokens, K = n_cols (GGUF ne0, the reduced dimension), N = n_rows (GGUF ne1, output features).
A weight is N rows of K values, each row K / block_values blocks of block_bytes, kept in the file's bytes.

`w` is the tensor's raw bytes: a uint8 array (a np.memmap slice is fine) of N * row_bytes(qtype, K) bytes, any
shape. A typed array (float32 for F32, float16 for F16) is taken as its bytes too; no conversion is done.
Results follow llama.cpp: x is first rounded to the weight type's vec_dot_type (see activations.py), so they
differ from x @ dequantize(w).T by that rounding, as llama.cpp's do.

Threads: numba's (numba.set_num_threads). Kernels compile on first use and are cached next to this package
(numba cache=True); for a read-only install set NUMBA_CACHE_DIR to a writable directory.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from moe_tier.errors import MoeTierError
from moe_tier.kernels import cpu, cpu_kquants
from moe_tier.kernels.activations import Activations
from moe_tier.kernels.cpu import Kernel

_KERNELS = {**cpu.KERNELS, **cpu_kquants.KERNELS}
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)
# Below this much weight traffic a matmul runs on one thread: a parallel region costs a fork-join, and on a
# busy machine a worker that is not scheduled stalls the whole region for a time slice (measured here under
# load: a 0.6 MB Q4_K matvec took 0.15 ms on one thread and 12 ms on two).
PARALLEL_MIN_BYTES = 4 * 2**20


def block_shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(values per block, bytes per block), from gguf.GGML_QUANT_SIZES."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one weight row of n_cols values."""
    block_values, block_bytes = block_shape(qtype)
    return n_cols // block_values * block_bytes


def _kernel(qtype: GGMLQuantizationType) -> Kernel:
    """The kernel of a supported type (an int works too); a dict lookup, as matmul runs ~100 times per token."""
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        raise MoeTierError(None, f"unsupported quant type {GGMLQuantizationType(qtype).name}")
    return kernel


def _rows(w: np.ndarray, qtype: GGMLQuantizationType, n_rows: int, n_cols: int) -> np.ndarray:
    """The weight bytes as a contiguous (N, row_bytes) uint8 view, after checking the sizes agree (qtype supported)."""
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_cols % block_values:
        name = GGMLQuantizationType(qtype).name
        raise MoeTierError(None, f"{n_cols} columns is not a multiple of the {name} block ({block_values})")
    raw = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
    expected = n_rows * (n_cols // block_values * block_bytes)
    if raw.size != expected:
        name = GGMLQuantizationType(qtype).name
        raise MoeTierError(None, f"{name} weight of {n_rows}x{n_cols} needs {expected} bytes, got {raw.size}")
    return raw.reshape(n_rows, -1)


def matmul(x: np.ndarray | Activations, w: np.ndarray, qtype: GGMLQuantizationType, n_rows: int,
           n_cols: int) -> np.ndarray:
    """x (T, K=n_cols) float32 @ W.T for W (N=n_rows, K) stored as raw blocks in w; returns (T, N) float32.
    Pass x as Activations where several weights read it, so that it is converted once."""
    kernel = _kernel(qtype)
    rows = _rows(w, qtype, n_rows, n_cols)
    acts = x if isinstance(x, Activations) else Activations(x)
    n_tok = len(acts.x)
    if acts.x.ndim != 2 or acts.x.shape[1] != n_cols:
        raise MoeTierError(None, f"activations of shape {acts.x.shape} do not match a weight of {n_cols} columns")
    out = np.zeros((n_tok, n_rows), dtype=np.float32)
    if n_tok and n_rows:
        prepared = acts.converted(kernel.prepare)
        if rows.nbytes * n_tok >= PARALLEL_MIN_BYTES or numba.get_num_threads() == 1:
            kernel.run(rows, prepared, out)
        else:
            threads = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                kernel.run(rows, prepared, out)
            finally:
                numba.set_num_threads(threads)
    return out


def get_rows(w: np.ndarray, qtype: GGMLQuantizationType, n_cols: int, rows: np.ndarray) -> np.ndarray:
    """Dequantize the selected rows (an embedding lookup): (len(rows), K) float32, exactly as gguf does."""
    _kernel(qtype)  # raises for an unsupported type
    raw = np.asarray(w).reshape(-1).view(np.uint8)
    table = _rows(raw, qtype, raw.size // max(row_bytes(qtype, n_cols), 1), n_cols)
    picked = table[np.asarray(rows, dtype=np.int64)]
    return np.ascontiguousarray(quants.dequantize(picked, qtype), dtype=np.float32).reshape(len(picked), n_cols)
