"""Activation conversion to a weight type's `vec_dot_type`, bit-for-bit as llama.cpp's x86 CPU backend does it.

llama.cpp never multiplies float activations by quantized weights: ggml_compute_forward_mul_mat first converts
each row of x with `type_traits_cpu[vec_dot_type].from_float` (ggml-cpu/arch/x86/quants.c), then takes integer dot
products per block. Reproducing that conversion exactly is what makes our logits match llama.cpp's.

Shape key: T tokens, K values per token, B = K / block (32 for Q8_0/Q8_1, 256 for Q8_K), S = K / 16.
Quantized values are int8, as in ggml's block_q8_0 / block_q8_1 / block_q8_K; the kernels take int32 dot
products of them with the weights' integer quants, exactly as the C code does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numba import njit
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK8_0, _ = GGML_QUANT_SIZES[Q.Q8_0]
QK_K, _ = GGML_QUANT_SIZES[Q.Q8_K]
# fp16 bit pattern -> float32; a 256 KiB table beats bit-twiddling for the kernels' scattered per-block scales.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


class QuantizedActivations(NamedTuple):
    """x in a vec_dot_type: qs (T, K) int8, d (T, B) float32 block scales, extra per-type sums.

    extra is (T, B) float32 `s` for Q8_1 (fp16(d * sum qs), used by the Q4_1/Q5_1 dot), (T, S) int32 `bsums`
    for Q8_K (sums of 16 values, used for the K-quants' block minimums), and (T, 0) otherwise.
    """

    qs: np.ndarray
    d: np.ndarray
    extra: np.ndarray


class Activations:
    """x (T, K) float32 with its conversions for the kernels, each made on first use and kept.

    At one token, quantizing x costs about as much as a small matmul; every matmul that reads the same x (q, k and
    v; gate and up of every expert of a layer) asks the same object, so x is quantized once for all of them.
    A conversion is a tuple of arrays with T rows (see cpu.Kernel), so `rows` selects tokens from it as well.
    """

    def __init__(self, x: np.ndarray, converted: dict | None = None):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self._converted = {} if converted is None else converted

    def converted(self, prepare: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        if prepare not in self._converted:
            self._converted[prepare] = prepare(self.x)
        return self._converted[prepare]

    def rows(self, tokens: np.ndarray) -> Activations:
        """The tokens `tokens` (indices into T), conversions included."""
        converted = {prepare: tuple(a[tokens] for a in arrays) for prepare, arrays in self._converted.items()}
        return Activations(self.x[tokens], converted)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    t, k = x.shape
    return np.ascontiguousarray(x, dtype=np.float32).reshape(t, k // size, size)


def quantize_q8_0(x: np.ndarray) -> QuantizedActivations:
    """quantize_row_q8_0, AVX path: id = 127/amax (not 1/d), round half to even; d stored as fp16."""
    xb = _blocks(x, QK8_0)
    qs = np.empty(xb.shape, np.int8)
    d = np.empty(xb.shape[:2], np.float32)
    _q8_0(xb, qs, d)
    d16 = d.astype(np.float16).astype(np.float32)  # numba has no float16
    return QuantizedActivations(qs.reshape(x.shape), d16, np.zeros((x.shape[0], 0), np.float32))


@njit(cache=True)
def _q8_0(xb, qs, d):
    """xb (T, B, 32) float32 -> qs (T, B, 32) int8 and the unrounded float32 scales d (T, B)."""
    for t in range(xb.shape[0]):
        for b in range(xb.shape[1]):
            amax = np.float32(0.0)
            for i in range(xb.shape[2]):
                amax = max(amax, abs(xb[t, b, i]))
            d[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            for i in range(xb.shape[2]):
                qs[t, b, i] = np.int8(np.rint(np.float32(xb[t, b, i] * inv)))


def quantize_q8_1(x: np.ndarray) -> QuantizedActivations:
    """quantize_row_q8_1, AVX path: as Q8_0, plus s = fp16(d * sum(qs)) with the unrounded float32 d."""
    q8 = quantize_q8_0(x)
    xb = _blocks(x, QK8_0)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)
    sums = q8.qs.reshape(xb.shape).sum(axis=-1, dtype=np.int32).astype(np.float32)
    s = (d * sums).astype(np.float16).astype(np.float32)
    return QuantizedActivations(q8.qs, q8.d, s)


def quantize_q8_k(x: np.ndarray) -> QuantizedActivations:
    """quantize_row_q8_K_ref (x86 uses the reference): scale from the signed value of largest magnitude
    (first one on ties), iscale = -127/max, nearest_int (half to even), min(127, .); d = 1/iscale in float32.
    Compiled: at one token per step, numpy's temporaries cost as much as a small matmul."""
    xb = _blocks(x, QK_K)
    qs = np.empty(xb.shape, np.int8)
    d = np.empty(xb.shape[:2], np.float32)
    bsums = np.empty((x.shape[0], x.shape[1] // 16), np.int32)
    _q8_k(xb, qs, d, bsums)
    return QuantizedActivations(qs.reshape(x.shape), d, bsums)


@njit(cache=True)
def _q8_k(xb, qs, d, bsums):
    """xb (T, B, 256) float32 -> qs (T, B, 256) int8, d (T, B) float32, bsums (T, B * 16) int32."""
    for t in range(xb.shape[0]):
        for b in range(xb.shape[1]):
            amax, vmax = np.float32(0.0), np.float32(0.0)
            for i in range(xb.shape[2]):
                if abs(xb[t, b, i]) > amax:
                    amax, vmax = abs(xb[t, b, i]), xb[t, b, i]
            iscale = np.float32(-127.0) / vmax if amax != 0 else np.float32(0.0)
            d[t, b] = np.float32(1.0) / iscale if amax != 0 else np.float32(0.0)
            for g in range(xb.shape[2] // 16):
                total = 0
                for i in range(16 * g, 16 * g + 16):
                    q = min(np.rint(np.float32(iscale * xb[t, b, i])), np.float32(127.0))
                    qs[t, b, i] = np.int8(q)
                    total += np.int32(q)
                bsums[t, b * (xb.shape[2] // 16) + g] = total


def to_f16(x: np.ndarray) -> np.ndarray:
    """ggml_cpu_fp32_to_fp16 (F16C, round to nearest even), widened back to float32. Compiled: numpy's cast takes
    ~60 ns a value whose result is an f16 subnormal, and softmax outputs are full of them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.float32)
    _round_f16(x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint32))
    return out


@njit(cache=True)
def _round_f16(bits, out):
    """float32 bit patterns -> the bit patterns of the nearest float16 values (ties to even) as float32, NaN payloads
    cut to f16's as numpy's cast does. Biased exponent e: 113.. normal in f16, 102..112 an f16 subnormal
    k * 2**-24, below that zero."""
    for i in range(bits.size):
        b = np.int64(bits[i])
        sign, mag, e = b & 0x80000000, b & 0x7FFFFFFF, (b >> 23) & 0xFF
        if mag > 0x7F800000:
            r = mag & 0x7FFFE000 if mag & 0x7FE000 else 0x7F802000
        elif mag >= 0x477FF000:  # rounds to 65536 or more: infinity
            r = 0x7F800000
        elif e >= 113:
            r = (mag + 0xFFF + ((mag >> 13) & 1)) & 0x7FFFE000
        elif e >= 102:
            shift = 126 - e
            m = 0x800000 | (mag & 0x7FFFFF)
            k, rest, half = m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1)
            if rest > half or (rest == half and k & 1):
                k += 1
            top = 0
            while k >> (top + 1):
                top += 1
            r = ((top + 103) << 23) | ((k << (23 - top)) & 0x7FFFFF) if k else 0
        else:
            r = 0
        out[i] = np.uint32(sign | r)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet; widened back to float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), rounded).astype(np.uint32)
    return (bits << np.uint32(16)).view(np.float32)


def from_f16(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact) through F16_TO_F32: numpy's astype has no vector path for it and is ~4x slower,
    and attention widens a layer's whole f16 KV cache every step."""
    bits = np.ascontiguousarray(x).view(np.uint16)
    out = np.empty(x.shape, np.float32)
    _lookup(bits.reshape(-1), F16_TO_F32, out.reshape(-1))
    return out


@njit(cache=True)
def _lookup(bits, table, out):
    for i in range(bits.size):
        out[i] = table[bits[i]]
