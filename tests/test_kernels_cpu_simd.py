"""cpu_simd's Q4_K block dot, both lowerings (x86 AVX2 + F16C where the host has them, generic vector IR
everywhere), against integer sums built from gguf's dequantizer and numpy's fp16 conversion.

Shape key: B = 6 super-blocks of 256 values (144 bytes), each with its own 256 x values. Blocks 0 and 1 are
extremes: every nibble 15 and every scale and minimum 63, against x all -128 and all 127 (vpmaddubsw's int16
pairs must not saturate).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from numba import njit

from moe_tier.kernels import cpu_simd

QK_K, BLOCK_BYTES = GGML_QUANT_SIZES[Q.Q4_K]
B = 6
ONE_F16, ZERO_F16 = (np.array([v], np.float16).view(np.uint8) for v in (1.0, 0.0))


def runner(block_fn):
    @njit
    def run(w, x, bsum, out):
        for b in range(out.size):
            out[b] = block_fn(w, b * 144, x, (b % (x.size // 256)) * 256, bsum, (b % (bsum.size // 16)) * 16)

    return run


LOWERINGS = {"generic": runner(cpu_simd.q4_k_block_generic), "x86": runner(cpu_simd.q4_k_block_x86)}


def skip_unless_host_runs(lowering: str) -> None:
    if lowering == "x86" and not cpu_simd.HAS_X86:
        pytest.skip("host CPU lacks AVX2 or F16C")


def blocks_and_x(seed: int):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (B, BLOCK_BYTES), dtype=np.uint8)
    w[:2, 4:] = 0xFF  # scales / minimums 63 (all 6-bit fields set), nibbles 15
    w[:, 0:4] = rng.uniform(-0.02, 0.02, (B, 2)).astype(np.float16).view(np.uint8)
    x = rng.integers(-128, 128, (B, QK_K), dtype=np.int8)
    x[0], x[1] = -128, 127
    return w, x


def reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B,) float32 d * sumi - dmin * summ: sumi = sum scale * nibble * x and summ = sum min * (x summed per 32)
    as exact integers from gguf.quants.dequantize with d = 1, dmin = 0 (giving scale * nibble) and d = 0,
    dmin = 1 (giving -min)."""
    scaled, mins = w.copy(), w.copy()
    scaled[:, 0:2], scaled[:, 2:4] = ONE_F16, ZERO_F16
    mins[:, 0:2], mins[:, 2:4] = ZERO_F16, ONE_F16
    wq = quants.dequantize(scaled, Q.Q4_K).reshape(B, QK_K).astype(np.int64)
    mn = -quants.dequantize(mins, Q.Q4_K).reshape(B, 8, 32)[:, :, 0].astype(np.int64)
    sumi = (wq * x).sum(axis=-1).astype(np.float32)
    summ = (mn * x.reshape(B, 8, 32).astype(np.int64).sum(axis=-1)).sum(axis=-1).astype(np.float32)
    d, dmin = (w[:, o:o + 2].copy().view(np.float16)[:, 0].astype(np.float32) for o in (0, 2))
    return d * sumi - dmin * summ


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_q4_k_block_is_exact(lowering):
    skip_unless_host_runs(lowering)
    w, x = blocks_and_x(seed=3)
    bsum = x.reshape(B, 16, 16).sum(axis=-1, dtype=np.int32)
    out = np.zeros(B, np.float32)
    LOWERINGS[lowering](w.reshape(-1), x.reshape(-1), bsum.reshape(-1), out)
    np.testing.assert_array_equal(out, reference(w, x))


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_q4_k_block_reads_every_fp16_scale(lowering):
    """All 65536 fp16 patterns as d, against a block whose sumi is 1 and summ 0: the result is d itself
    (numpy's float16 conversion), subnormals, infinities and NaNs included."""
    skip_unless_host_runs(lowering)
    w = np.zeros((1 << 16, BLOCK_BYTES), np.uint8)
    w[:, 0:2] = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    w[:, 4] = 1  # sub-block 0's scale; its minimum and all others stay 0
    w[:, 16] = 1  # first nibble
    x = np.zeros(QK_K, np.int8)
    x[0] = 1
    out = np.zeros(1 << 16, np.float32)
    LOWERINGS[lowering](w.reshape(-1), x, np.zeros(16, np.int32), out)
    expected = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_q4_k_block_rejects_non_contiguous_arrays():
    w, x = blocks_and_x(seed=4)
    bsum = x.reshape(B, 16, 16).sum(axis=-1, dtype=np.int32)
    with pytest.raises(Exception, match="q4_k_block"):
        LOWERINGS["generic"](w[:, ::2], x.reshape(-1), bsum.reshape(-1), np.zeros(B, np.float32))
