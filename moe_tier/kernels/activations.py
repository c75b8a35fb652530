"""Activation conversion to a weight type's `vec_dot_type`, bit-for-bit as llama.cpp's x86 CPU backend does it.

llama.cpp never multiplies float activations by quantized weights: ggml_compute_forward_mul_mat first converts
each row of x with `type_traits_cpu[vec_dot_type].from_float` (ggml-cpu/arch/x86/quants.c), then takes integer dot
products per block. Reproducing that conversion exactly is what makes our logits match llama.cpp's.

Shape key: T tokens, K values per token, B = K / block (32 for Q8_0/Q8_1, 256 for Q8_K), S = K / 16.
Quantized values are int8, as in ggml's block_q8_0 / block_q8_1 / block_q8_K; the kernels take int32 dot
products of them with the weights' integer quants, exactly as the C code does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK8_0, _ = GGML_QUANT_SIZES[Q.Q8_0]
QK_K, _ = GGML_QUANT_SIZES[Q.Q8_K]


class QuantizedActivations(NamedTuple):
    """x in a vec_dot_type: qs (T, K) int8, d (T, B) float32 block scales, extra per-type sums.

    extra is (T, B) float32 `s` for Q8_1 (fp16(d * sum qs), used by the Q4_1/Q5_1 dot), (T, S) int32 `bsums`
    for Q8_K (sums of 16 values, used for the K-quants' block minimums), and (T, 0) otherwise.
    """

    qs: np.ndarray
    d: np.ndarray
    extra: np.ndarray


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    t, k = x.shape
    return np.ascontiguousarray(x, dtype=np.float32).reshape(t, k // size, size)


def quantize_q8_0(x: np.ndarray) -> QuantizedActivations:
    """quantize_row_q8_0, AVX path: id = 127/amax (not 1/d), round half to even; d stored as fp16."""
    xb = _blocks(x, QK8_0)
    amax = np.abs(xb).max(axis=-1)
    d = amax / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    qs = np.rint(xb * inv[..., None])
    d16 = d.astype(np.float16).astype(np.float32)
    return QuantizedActivations(qs.reshape(x.shape).astype(np.int8), d16, np.zeros((x.shape[0], 0), np.float32))


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
    (first one on ties), iscale = -127/max, nearest_int (half to even), min(127, .); d = 1/iscale in float32."""
    xb = _blocks(x, QK_K)
    first_max = np.take_along_axis(xb, np.abs(xb).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(first_max != 0, np.float32(-127.0) / first_max, np.float32(0.0)).astype(np.float32)
        d = np.where(first_max != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    qs = np.minimum(np.rint(iscale[..., None] * xb), np.float32(127.0)).reshape(x.shape).astype(np.int8)
    bsums = qs.reshape(x.shape[0], -1, 16).sum(axis=-1, dtype=np.int32)
    return QuantizedActivations(qs, d, bsums)


def to_f16(x: np.ndarray) -> np.ndarray:
    """ggml_cpu_fp32_to_fp16 (F16C, round to nearest even), widened back to float32 for the kernel."""
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet; widened back to float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), rounded).astype(np.uint32)
    return (bits << np.uint32(16)).view(np.float32)
