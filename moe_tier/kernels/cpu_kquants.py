"""numba matmul kernels for the 256-value super-block quants (Q2_K..Q6_K, IQ4_XS); activations go to Q8_K.

Shape key: T tokens, K = n_cols, N = n_rows, B = K / 256 super-blocks per row, M = K / 16 (IQ4_XS reads none).
  w     (N, B * block_bytes) uint8   raw GGUF blocks
  xq    (T, K) int8                  Q8_K values
  xd    (T, B) float32               Q8_K scales
  bsums (T, M) int32                 Q8_K's bsums, sums of xq per 16
  out   (T, N) float32, zeroed

IQ4_XS: each super-block is decoded once into wq[256] = sub-block scale * quant (int16: |scale * quant| <= 4096), then
dotted with every token in int32 (|sum| < 256 * 4096 * 127 < 2**31), which equals ggml's aux32 sums exactly:
d_w * d_x * (wq . xq). Q2_K..Q6_K (the Q*_K_S / _M mixes) skip wq: a whole row's dot is ggml's AVX2 code as
LLVM vector IR (cpu_simd.py), 2.5x (Q4_K) to 7x (Q6_K, Q2_K) faster than this decoder was.
Block layouts and element order follow ggml-quants.c (dequantize_row_*) and gguf.quants.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from numba import njit, prange

from moe_tier.kernels import activations as act, cpu_simd as simd
from moe_tier.kernels.cpu import F16_TO_F32, ROWS_PER_TASK, Kernel, f16_at

QK_K, _ = GGML_QUANT_SIZES[Q.Q8_K]  # values per super-block: 256

# kvalues_iq4nl (ggml-common.h), the IQ4_NL / IQ4_XS non-linear grid.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)

# The decoder: from one block's bytes blk, fill wq[qk] with sub-block scale * quant, return d. It
# vectorizes (10x) when inlined into the row loop, in int16, one scale per inner loop, blk a per-block slice
# (indices provably non-negative), with a compile-time inner trip count (up to 2x faster).


@njit(cache=True, inline="always")
def _decode_iq4_xs(qk, blk, wq, sc, values):
    """d | scales_h u16 | scales_l[4] | qs[128]; grid values, a 6-bit scale - 32 per 32 values."""
    n16 = QK_K // 16
    scales_h = np.int64(blk[2]) | (np.int64(blk[3]) << 8)
    for s in range(8):
        low = (blk[4 + s // 2] >> (4 * (s % 2))) & 15
        sc[s] = (low | (((scales_h >> (2 * s)) & 3) << 4)) - 32
    for s in range(8):
        scale = np.int16(sc[s])
        for l in range(n16):
            byte = blk[8 + 16 * s + l]
            wq[32 * s + l] = scale * values[byte & 15]
            wq[32 * s + 16 + l] = scale * values[byte >> 4]
    return f16_at(F16_TO_F32, blk, 0)


@njit(cache=True, inline="always")
def _dot_block(wq, d, xq, xd, b, r, out):
    """Super-block b of row r against every token: the int32 sum wq . xq (ggml's aux32), times d * d_x."""
    qk = wq.size
    for t in range(xq.shape[0]):
        xb = xq[t, qk * b:qk * (b + 1)]
        s = np.int32(0)
        for i in range(qk):
            s += np.int32(wq[i] * np.int16(xb[i]))
        out[t, r] += xd[t, b] * (d * np.float32(np.int32(s)))


# One row function per type, each a separate compilation (the decoder inlined, or its cpu_simd intrinsics): a
# single function that branches on the type per block is 3x slower.


@njit(cache=True, fastmath=True, inline="always")
def _rows_simd(rows1, rows4, w, xq, xd, bsums, out, r0, r1):
    """Q2_K..Q6_K, no decoder: each row's whole dot is one cpu_simd call, four tokens per call while four
    remain. w, xq, xd and bsums (Q8_K's own) are C-contiguous (matmul makes them so)."""
    n_tok, n_blk = xd.shape
    x_step, bsum_step = xq.shape[1], bsums.shape[1]
    for r in range(r0, r1):
        wo = r * w.shape[1]
        for t in range(0, n_tok - 3, 4):
            v = rows4(w, wo, n_blk, xq, t * x_step, x_step, xd, t * n_blk, n_blk, bsums, t * bsum_step, bsum_step)
            for i in range(4):
                out[t + i, r] = v[i]
        for t in range(n_tok - n_tok % 4, n_tok):
            (out[t, r],) = rows1(w, wo, n_blk, xq, t * x_step, x_step, xd, t * n_blk, n_blk, bsums, t * bsum_step, 0)


@njit(cache=True, fastmath=True)
def _rows_q2_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    _rows_simd(simd.q2_k_rows1, simd.q2_k_rows4, w, xq, xd, bsums, out, r0, r1)


@njit(cache=True, fastmath=True)
def _rows_q3_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    _rows_simd(simd.q3_k_rows1, simd.q3_k_rows4, w, xq, xd, bsums, out, r0, r1)


@njit(cache=True, fastmath=True)
def _rows_q4_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    _rows_simd(simd.q4_k_rows1, simd.q4_k_rows4, w, xq, xd, bsums, out, r0, r1)


@njit(cache=True, fastmath=True)
def _rows_q5_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    _rows_simd(simd.q5_k_rows1, simd.q5_k_rows4, w, xq, xd, bsums, out, r0, r1)


@njit(cache=True, fastmath=True)
def _rows_q6_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    _rows_simd(simd.q6_k_rows1, simd.q6_k_rows4, w, xq, xd, bsums, out, r0, r1)


@njit(cache=True, fastmath=True)
def _rows_iq4_xs(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1):
    wq, sc = np.empty(qk, np.int16), np.empty(8, np.int32)
    for r in range(r0, r1):
        for b in range(xd.shape[1]):
            d = _decode_iq4_xs(qk, w[r, b * block_bytes:(b + 1) * block_bytes], wq, sc, values)
            _dot_block(wq, d, xq, xd, b, r, out)


@njit(cache=True, parallel=True)
def _kquant_par(kind, w, qk, block_bytes, xq, xd, bsums, values, out):
    """Row tasks in parallel around the serial row functions (see cpu.py: parfor bodies do not vectorize)."""
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        r0, r1 = task * ROWS_PER_TASK, min(w.shape[0], (task + 1) * ROWS_PER_TASK)
        if kind == 2:
            _rows_q2_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)
        elif kind == 3:
            _rows_q3_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)
        elif kind == 4:
            _rows_q4_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)
        elif kind == 5:
            _rows_q5_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)
        elif kind == 6:
            _rows_q6_k(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)
        else:
            _rows_iq4_xs(w, qk, block_bytes, xq, xd, bsums, values, out, r0, r1)


def prepare_q8_k(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q8_K values, scales and bsums (IQ4_XS's row function takes and ignores the bsums)."""
    xq = act.quantize_q8_k(x)
    return xq.qs, xq.d, xq.extra


def _kernel(qtype: Q, kind: int) -> Kernel:
    """kind selects the row function in _kquant_par: the bit width (2..6), 0 for IQ4_XS."""
    qk, block_bytes = GGML_QUANT_SIZES[qtype]

    def run(w: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray) -> None:
        xq, xd, bsums = prepared
        _kquant_par(kind, w, qk, block_bytes, xq, xd, bsums, IQ4NL_VALUES, out)

    return Kernel(prepare_q8_k, run)


KERNELS = {
    Q.Q2_K: _kernel(Q.Q2_K, 2),
    Q.Q3_K: _kernel(Q.Q3_K, 3),
    Q.Q4_K: _kernel(Q.Q4_K, 4),
    Q.Q5_K: _kernel(Q.Q5_K, 5),
    Q.Q6_K: _kernel(Q.Q6_K, 6),
    Q.IQ4_XS: _kernel(Q.IQ4_XS, 0),
}
