"""cpu_simd's Q4_K block dot, both lowerings (x86 AVX2 where the host has it, generic vector IR everywhere),
against integer sums built from gguf's dequantizer.

Shape key: B = 6 super-blocks of 256 values (144 bytes), one token. Blocks 0 and 1 are extremes: every nibble
15 and every scale and minimum 63, against x all -128 and all 127 (vpmaddubsw's int16 pairs must not saturate).
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
        for b in range(out.shape[0]):
            out[b, 0], out[b, 1] = block_fn(w, b * 144, x, b * 256, bsum, b * 8)

    return run


LOWERINGS = {"generic": runner(cpu_simd.q4_k_block_generic), "avx2": runner(cpu_simd.q4_k_block_avx2)}


def blocks_and_x(seed: int):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (B, BLOCK_BYTES), dtype=np.uint8)
    w[:2, 4:] = 0xFF  # scales / minimums 63 (all 6-bit fields set), nibbles 15
    x = rng.integers(-128, 128, (B, QK_K), dtype=np.int8)
    x[0], x[1] = -128, 127
    return w, x


def reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B, 2) int64: sum scale * nibble * x, and sum min * (x summed per 32), from gguf.quants.dequantize with
    d = 1, dmin = 0 (giving scale * nibble) and d = 0, dmin = 1 (giving -min)."""
    scaled, mins = w.copy(), w.copy()
    scaled[:, 0:2], scaled[:, 2:4] = ONE_F16, ZERO_F16
    mins[:, 0:2], mins[:, 2:4] = ZERO_F16, ONE_F16
    wq = quants.dequantize(scaled, Q.Q4_K).reshape(B, QK_K).astype(np.int64)
    mn = -quants.dequantize(mins, Q.Q4_K).reshape(B, 8, 32)[:, :, 0].astype(np.int64)
    bsum = x.reshape(B, 8, 32).astype(np.int64).sum(axis=-1)
    return np.stack([(wq * x).sum(axis=-1), (mn * bsum).sum(axis=-1)], axis=-1)


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
def test_q4_k_block_is_exact(lowering):
    if lowering == "avx2" and not cpu_simd.HAS_AVX2:
        pytest.skip("host CPU lacks AVX2")
    w, x = blocks_and_x(seed=3)
    bsum = x.reshape(B, 8, 32).sum(axis=-1, dtype=np.int32)
    out = np.zeros((B, 2), np.int32)
    LOWERINGS[lowering](w.reshape(-1), x.reshape(-1), bsum.reshape(-1), out)
    np.testing.assert_array_equal(out, reference(w, x))


def test_q4_k_block_rejects_non_contiguous_arrays():
    w, x = blocks_and_x(seed=4)
    bsum = x.reshape(B, 8, 32).sum(axis=-1, dtype=np.int32)
    with pytest.raises(Exception, match="q4_k_block"):
        LOWERINGS["generic"](w[:, ::2], x.reshape(-1), bsum.reshape(-1), np.zeros((B, 2), np.int32))
