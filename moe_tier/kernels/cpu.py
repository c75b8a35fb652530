"""numba matmul kernels for float weights and the 32-value block quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4).

Shape key: T tokens, K = n_cols, N = n_rows, B = K / 32 blocks per row.
  w   (N, B * block_bytes) uint8   raw GGUF blocks, one weight row per array row
  xq  (T, K) int8                  activations in the vec_dot_type (float32, rounded, for float weights)
  xd  (T, B) float32               activation block scales; xs (T, B) the Q8_1 `s` sums
  out (T, N) float32, zeroed       out[t, r] = sum over blocks of that block's dot, as llama.cpp sums it

Loop order: row tasks in parallel (a prange shell around a serial row function: written inside the parfor
body, the same loops did not vectorize), then rows, then tokens, then blocks. One row's blocks stay in L1/L2
while every token passes over them, so weights are read from memory once whatever T is; decoding a 32-value
block again per token is cheaper than the buffer it would take to keep it (the K-quants, with costlier
decoding, decode once per block for all tokens instead). The dots are int32 sums of int16 products, as in
ggml (LLVM turns them into vpmaddwd); only the float combination of blocks is reordered by fastmath. Q4_0's
row dot is LLVM vector IR instead (cpu_simd.py, ggml's AVX2 loop), 2.5x faster than the loops below.
Two things keep LLVM vectorizing the block loops (else it emits byte gathers, several times slower): block
sizes arrive as run-time values (a literal 32 gets unrolled and the vectorizer moves to the block loop), and
indices are unsigned (np.uint64), so numba's negative-index wraparound check disappears.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from numba import njit, prange

from moe_tier.kernels import activations as act, cpu_simd as simd
from moe_tier.kernels.activations import F16_TO_F32

ROWS_PER_TASK = 64  # rows per parallel task: amortises the scratch buffer and the call (Q4_K at 16: a few % slower)
# fastmath without reassociation or contraction: a kernel compiled in this process and the same kernel loaded from
# numba's cache gave Q8_0 results 1e-7 apart (LLVM fused the block sums differently); these flags keep one order.
EXACT_ORDER = {"nnan", "ninf", "nsz", "arcp", "afn"}

# ggml_e8m0_to_fp32_half (ggml-impl.h): the MXFP4 block exponent, halved because its values are doubled.
E8M0_HALF_TO_F32 = np.array(
    [(0x00200000 << e) if e < 2 else ((e - 1) << 23) for e in range(256)], dtype=np.uint32
).view(np.float32)
# kvalues_mxfp4 (ggml-common.h): e2m1 values, doubled.
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@njit(cache=True)
def f16_at(f16, row, o):
    """The little-endian fp16 at byte offset o of row, as float32."""
    return f16[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@njit(cache=True, fastmath=True)
def _float_rows(w, kind, x, f16, out, r0, r1):
    """F32 (w as uint32 bits, kind 0), F16 (uint16, kind 1), BF16 (uint16, kind 2); x already rounded to the
    vec_dot_type and widened, so each product is exact and only the float32 summation order differs."""
    k = w.shape[1]
    n_tok = x.shape[0]
    bits = np.empty(k, np.uint32)
    wf = bits.view(np.float32)
    for r in range(r0, r1):
        row = w[r]
        if kind == 1:
            for i in range(k):
                wf[i] = f16[row[i]]
        else:
            shift = 16 if kind == 2 else 0
            for i in range(k):
                bits[i] = np.uint32(row[i]) << shift
        for t in range(n_tok):
            s = np.float32(0.0)
            for i in range(k):
                s += wf[i] * x[t, i]
            out[t, r] = s


@njit(cache=True, parallel=True)
def _float_par(w, kind, x, f16, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _float_rows(w, kind, x, f16, out, task * ROWS_PER_TASK, min(w.shape[0], (task + 1) * ROWS_PER_TASK))


@njit(cache=True, fastmath=EXACT_ORDER)
def _q8_0_rows(w, qk, xq, xd, f16, out, r0, r1):
    """ggml_vec_dot_q8_0_q8_0: w is the raw bytes viewed as int8 (the fp16 scale bytes are read unsigned)."""
    n_tok, n_blk = xd.shape
    block_bytes, uqk = np.uint64(qk + 2), np.uint64(qk)
    for r in range(r0, r1):
        row = w[r]
        for t in range(n_tok):
            acc = np.float32(0.0)
            for b in range(n_blk):
                o, xo = np.uint64(b) * block_bytes, np.uint64(b) * uqk
                dw = f16[np.int64(np.uint8(row[o])) | (np.int64(np.uint8(row[o + np.uint64(1)])) << 8)]
                s = np.int32(0)
                for j in range(qk):
                    uj = np.uint64(j)
                    s += np.int32(np.int16(row[o + np.uint64(2) + uj]) * np.int16(xq[t, xo + uj]))
                acc += np.float32(np.int32(s)) * (dw * xd[t, b])
            out[t, r] = acc


@njit(cache=True, parallel=True)
def _q8_0_par(w, qk, xq, xd, f16, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _q8_0_rows(w, qk, xq, xd, f16, out, task * ROWS_PER_TASK, min(w.shape[0], (task + 1) * ROWS_PER_TASK))


@njit(cache=True, fastmath=True)
def _nibble_rows(w, qk, layout, xq, xd, xsum, xs, values, scales, f16, out, r0, r1):
    """Q4_1, Q5_0, Q5_1, MXFP4: qk/2 bytes of nibbles (value j low, value j + qk/2 high), an optional
    32-bit fifth-bit mask, a block scale and an optional fp16 minimum. layout = (block_bytes, scale_bytes,
    min_offset, qh_offset, qs_offset, value_offset), offsets -1 when absent. The weight's integer value is
    code + value_offset (the offset applied through xsum, x's block sums), or values[code] when values is
    non-empty (MXFP4); scales maps the scale bytes to float32."""
    block_bytes, scale_bytes, min_off, qh_off, qs_off, value_off = layout
    n_tok, n_blk = xd.shape
    half = qk // 2
    ubb, uqk, uhalf, uqs = np.uint64(block_bytes), np.uint64(qk), np.uint64(half), np.uint64(qs_off)
    plain = qh_off < 0 and values.size == 0
    for r in range(r0, r1):
        row = w[r]
        for t in range(n_tok):
            acc = np.float32(0.0)
            for b in range(n_blk):
                o, xo = np.uint64(b) * ubb, np.uint64(b) * uqk
                code = np.int64(row[o])
                if scale_bytes == 2:
                    code |= np.int64(row[o + np.uint64(1)]) << 8
                qh = np.int64(0)
                if qh_off >= 0:
                    for i in range(4):
                        qh |= np.int64(row[o + np.uint64(qh_off + i)]) << (8 * i)
                s = np.int32(0)
                if plain:  # the general loop below, minus what Q4_1 lacks: 2x faster for it
                    for j in range(half):
                        uj = np.uint64(j)
                        byte = row[o + uqs + uj]
                        s += np.int32(np.int16(byte & 15) * np.int16(xq[t, xo + uj]))
                        s += np.int32(np.int16(byte >> 4) * np.int16(xq[t, xo + uhalf + uj]))
                else:
                    for j in range(half):
                        uj = np.uint64(j)
                        byte = row[o + uqs + uj]
                        lo = np.int16((byte & 15) | (((qh >> j) & 1) << 4))
                        hi = np.int16((byte >> 4) | (((qh >> (j + half)) & 1) << 4))
                        if values.size:
                            lo, hi = values[lo], values[hi]
                        s += np.int32(lo * np.int16(xq[t, xo + uj])) + np.int32(hi * np.int16(xq[t, xo + uhalf + uj]))
                s += np.int32(value_off * xsum[t, b])
                acc += np.float32(np.int32(s)) * (scales[code] * xd[t, b])
                if min_off >= 0:
                    acc += f16_at(f16, row, np.int64(o) + min_off) * xs[t, b]
            out[t, r] = acc


@njit(cache=True, fastmath=True)
def _q4_0_rows(w, xq, xd, out, r0, r1):
    """Q4_0: each row's whole dot is one cpu_simd call (ggml's AVX2 loop), four tokens per call while four
    remain; 2.5x the general nibble loop. w, xq and xd are C-contiguous (matmul and prepare_q8_0 make them so)."""
    n_tok, n_blk = xd.shape
    x_step = xq.shape[1]
    for r in range(r0, r1):
        wo = r * w.shape[1]
        for t in range(0, n_tok - 3, 4):
            v = simd.q4_0_rows4(w, wo, n_blk, xq, t * x_step, x_step, xd, t * n_blk, n_blk)
            for i in range(4):
                out[t + i, r] = v[i]
        for t in range(n_tok - n_tok % 4, n_tok):
            (out[t, r],) = simd.q4_0_rows1(w, wo, n_blk, xq, t * x_step, x_step, xd, t * n_blk, n_blk)


@njit(cache=True, parallel=True)
def _q4_0_par(w, xq, xd, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _q4_0_rows(w, xq, xd, out, task * ROWS_PER_TASK, min(w.shape[0], (task + 1) * ROWS_PER_TASK))


@njit(cache=True, parallel=True)
def _nibble_par(w, qk, layout, xq, xd, xsum, xs, values, scales, f16, out):
    for task in prange((w.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        r0, r1 = task * ROWS_PER_TASK, min(w.shape[0], (task + 1) * ROWS_PER_TASK)
        _nibble_rows(w, qk, layout, xq, xd, xsum, xs, values, scales, f16, out, r0, r1)


class Kernel(NamedTuple):
    """One weight type's matmul in two steps, so that x is converted once for every weight that reads it.

    prepare(x (T, K) float32) -> the arrays run reads, each with T rows (the conversion is per token, so a subset
    of tokens is a row selection); one function per activation type, shared by the weight types that use it.
    run(w (N, row_bytes) uint8, prepared, out (T, N) float32 zeroed): out = x W.T, row tasks on numba's threads.
    """

    prepare: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    run: Callable[[np.ndarray, tuple[np.ndarray, ...], np.ndarray], None]


def _widened(widen):
    def prepare(x: np.ndarray) -> tuple[np.ndarray]:
        return (widen(x),)

    return prepare


def _float_kernel(kind: int, bits_dtype: type, widen) -> Kernel:
    def run(w: np.ndarray, prepared: tuple[np.ndarray], out: np.ndarray) -> None:
        _float_par(w.view(bits_dtype), kind, prepared[0], F16_TO_F32, out)

    return Kernel(_widened(widen), run)


def prepare_q8_0(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q8_0 values, scales, per-block sums of the values (the Q4_0 / Q5_0 / MXFP4 value offsets), and the scales
    again where Q8_1's sums would go (read only for types with a minimum, which use prepare_q8_1)."""
    xq = act.quantize_q8_0(x)
    return xq.qs, xq.d, _block_sums(xq.qs), xq.d


def prepare_q8_1(x: np.ndarray) -> tuple[np.ndarray, ...]:
    xq = act.quantize_q8_1(x)
    return xq.qs, xq.d, _block_sums(xq.qs), xq.extra


def _block_sums(qs: np.ndarray) -> np.ndarray:
    return qs.reshape(qs.shape[0], -1, act.QK8_0).sum(axis=-1, dtype=np.int32)


def _q8_0_run(w: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    xq, xd = prepared[:2]
    _q8_0_par(w.view(np.int8), act.QK8_0, xq, xd, F16_TO_F32, out)


def _q4_0_run(w: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    xq, xd = prepared[:2]
    _q4_0_par(w, xq, xd, out)


def _nibble_kernel(qtype: Q, value_off: int, min_off: int, qh_off: int, values=(), scales=F16_TO_F32) -> Kernel:
    """The activation type is Q8_1 iff the block has a minimum (Q4_1, Q5_1), else Q8_0."""
    qk, block_bytes = GGML_QUANT_SIZES[qtype]
    scale_bytes = 2 if scales is F16_TO_F32 else 1
    layout = np.array([block_bytes, scale_bytes, min_off, qh_off, block_bytes - qk // 2, value_off], np.int64)
    values = np.array(values, dtype=np.int16)

    def run(w: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray) -> None:
        xq, xd, xsum, xs = prepared
        _nibble_par(w, qk, layout, xq, xd, xsum, xs, values, scales, F16_TO_F32, out)

    return Kernel(prepare_q8_1 if min_off >= 0 else prepare_q8_0, run)


KERNELS = {
    Q.F32: _float_kernel(0, np.uint32, lambda x: np.ascontiguousarray(x, dtype=np.float32)),
    Q.F16: _float_kernel(1, np.uint16, act.to_f16),
    Q.BF16: _float_kernel(2, np.uint16, act.to_bf16),
    Q.Q8_0: Kernel(prepare_q8_0, _q8_0_run),
    Q.Q4_0: Kernel(prepare_q8_0, _q4_0_run),
    Q.Q4_1: _nibble_kernel(Q.Q4_1, value_off=0, min_off=2, qh_off=-1),
    Q.Q5_0: _nibble_kernel(Q.Q5_0, value_off=-16, min_off=-1, qh_off=2),
    Q.Q5_1: _nibble_kernel(Q.Q5_1, value_off=0, min_off=2, qh_off=4),
    Q.MXFP4: _nibble_kernel(Q.MXFP4, 0, -1, -1, values=MXFP4_VALUES, scales=E8M0_HALF_TO_F32),
}
