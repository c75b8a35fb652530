"""cpu_simd's Q4_K block dots, every lowering (x86 AVX2 + F16C where the host has them, generic vector IR
everywhere; one and four tokens per call), against integer sums built from gguf's dequantizer and numpy's
fp16 conversion.

Shape key: B = 6 super-blocks of 256 values (144 bytes), T = 5 tokens (one call of four, one of one; each
token meets every block). Blocks 0 and 1 are extremes: every nibble 15 and every scale and minimum 63; tokens
0 and 1 are all -128 and all 127 (vpmaddubsw's int16 pairs must not saturate).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from numba import njit

from moe_tier.kernels import cpu_simd

QK_K, BLOCK_BYTES = GGML_QUANT_SIZES[Q.Q4_K]
B, T = 6, 5
ONE_F16, ZERO_F16 = (np.array([v], np.float16).view(np.uint8) for v in (1.0, 0.0))
LOWERINGS = sorted(cpu_simd.LOWERINGS)  # (x86, tokens per call)


def runner(x86: bool, n_tok: int):
    """out (B, T) float32: every block against every token, n_tok tokens per call; x (T, 256), bsum (T, 16)."""
    blocks = cpu_simd.LOWERINGS[x86, n_tok]

    @njit
    def run(w, x, bsum, out):
        for b in range(out.shape[0]):
            for t in range(0, out.shape[1] - n_tok + 1, n_tok):
                v = blocks(w, b * 144, x, t * 256, 256, bsum, t * 16, 16)
                for i in range(n_tok):
                    out[b, t + i] = v[i]

    return run


def skip_unless_host_runs(x86: bool) -> None:
    if x86 and not cpu_simd.HAS_X86:
        pytest.skip("host CPU lacks AVX2 or F16C")


def blocks_and_x(seed: int):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (B, BLOCK_BYTES), dtype=np.uint8)
    w[:2, 4:] = 0xFF  # scales / minimums 63 (all 6-bit fields set), nibbles 15
    w[:, 0:4] = rng.uniform(-0.02, 0.02, (B, 2)).astype(np.float16).view(np.uint8)
    x = rng.integers(-128, 128, (T, QK_K), dtype=np.int8)
    x[0], x[1] = -128, 127
    return w, x


def reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B, T) float32 d * sumi - dmin * summ: sumi = sum scale * nibble * x and summ = sum min * (x summed per
    32) as exact integers from gguf.quants.dequantize with d = 1, dmin = 0 (giving scale * nibble) and d = 0,
    dmin = 1 (giving -min)."""
    scaled, mins = w.copy(), w.copy()
    scaled[:, 0:2], scaled[:, 2:4] = ONE_F16, ZERO_F16
    mins[:, 0:2], mins[:, 2:4] = ZERO_F16, ONE_F16
    wq = quants.dequantize(scaled, Q.Q4_K).reshape(B, QK_K).astype(np.int64)
    mn = -quants.dequantize(mins, Q.Q4_K).reshape(B, 8, 32)[:, :, 0].astype(np.int64)
    sumi = (wq @ x.T.astype(np.int64)).astype(np.float32)
    summ = (mn @ x.reshape(T, 8, 32).astype(np.int64).sum(axis=-1).T).astype(np.float32)
    d, dmin = (w[:, o:o + 2].copy().view(np.float16).astype(np.float32) for o in (0, 2))
    return d * sumi - dmin * summ


@pytest.mark.parametrize("x86, n_tok", LOWERINGS)
def test_q4_k_blocks_are_exact(x86, n_tok):
    skip_unless_host_runs(x86)
    w, x = blocks_and_x(seed=3)
    bsum = x.reshape(T, 16, 16).sum(axis=-1, dtype=np.int32)
    out = np.full((B, T), np.nan, np.float32)
    runner(x86, n_tok)(w.reshape(-1), x.reshape(-1), bsum.reshape(-1), out)
    expected = reference(w, x)
    covered = T - T % n_tok  # the tokens a whole call reaches
    np.testing.assert_array_equal(out[:, :covered], expected[:, :covered])


@pytest.mark.parametrize("x86", [False, True])
def test_q4_k_blocks_read_every_fp16_scale(x86):
    """All 65536 fp16 patterns as d, against a block whose sumi is 1 and summ 0: the result is d itself
    (numpy's float16 conversion), subnormals, infinities and NaNs included."""
    skip_unless_host_runs(x86)
    n = 1 << 16
    w = np.zeros((n, BLOCK_BYTES), np.uint8)
    w[:, 0:2] = np.arange(n, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    w[:, 4] = 1  # sub-block 0's scale; its minimum and all others stay 0
    w[:, 16] = 1  # first nibble
    x = np.zeros(QK_K, np.int8)
    x[0] = 1
    out = np.zeros((n, 1), np.float32)
    runner(x86, 1)(w.reshape(-1), x, np.zeros(16, np.int32), out)
    expected = np.arange(n, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(out[nan, 0]).all()
    np.testing.assert_array_equal(out[~nan, 0].view(np.uint32), expected[~nan].view(np.uint32))


def test_q4_k_blocks_reject_non_contiguous_arrays():
    w, x = blocks_and_x(seed=4)
    bsum = x.reshape(T, 16, 16).sum(axis=-1, dtype=np.int32)
    with pytest.raises(Exception, match="q4_k_blocks"):
        runner(False, 1)(w[:, ::2], x.reshape(-1), bsum.reshape(-1), np.zeros((B, T), np.float32))
