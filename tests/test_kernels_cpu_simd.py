"""cpu_simd's block dots (Q4_K, Q6_K), every lowering (x86 AVX2 + F16C where the host has them, generic
vector IR everywhere; one and four tokens per call), against exact integer sums built from gguf's dequantizer
and numpy's fp16 conversion.

Shape key: B = 6 super-blocks of 256 values, T = 5 tokens (one call of four, one of one; each token meets
every block). Blocks 0 and 1 are extremes: every quant at its maximum and every scale at an end of its range;
tokens 0 and 1 are all -128 and all 127 (vpmaddubsw's int16 pairs must not saturate).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from numba import njit

from moe_tier.kernels import cpu_simd

QK_K = 256
B, T = 6, 5
D_OFFSET = {Q.Q4_K: 0, Q.Q6_K: 208}  # byte offset of the fp16 d (Q4_K's dmin follows it)


def runner(qtype: Q, x86: bool, n_tok: int):
    """out (B, T) float32: every block against every token, n_tok tokens per call; x (T, 256), bsum (T, 16)."""
    blocks = cpu_simd.LOWERINGS[qtype, x86, n_tok]
    block_bytes = GGML_QUANT_SIZES[qtype][1]

    @njit
    def run(w, x, bsum, out):
        for b in range(out.shape[0]):
            for t in range(0, out.shape[1] - n_tok + 1, n_tok):
                v = blocks(w, b * block_bytes, x, t * 256, 256, bsum, t * 16, 16)
                for i in range(n_tok):
                    out[b, t + i] = v[i]

    return run


def skip_unless_host_runs(x86: bool) -> None:
    if x86 and not cpu_simd.HAS_X86:
        pytest.skip("host CPU lacks AVX2 or F16C")


def f16_bytes(values) -> np.ndarray:
    return np.asarray(values, np.float16).view(np.uint8)


def blocks_and_x(qtype: Q, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (B, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    if qtype == Q.Q4_K:
        w[:2, 4:] = 0xFF  # scales / minimums 63 (all 6-bit fields set), nibbles 15
        w[:, 0:4] = f16_bytes(rng.uniform(-0.02, 0.02, (B, 2)))
    else:
        w[:2, :192] = 0xFF  # quants 63
        w[0, 192:208], w[1, 192:208] = 0x80, 0x7F  # scales -128, 127
        w[:, 208:210] = f16_bytes(rng.uniform(-0.02, 0.02, (B, 1)))
    x = rng.integers(-128, 128, (T, QK_K), dtype=np.int8)
    x[0], x[1] = -128, 127
    return w, x


def with_f16(w: np.ndarray, offset: int, value: float) -> np.ndarray:
    w = w.copy()
    w[:, offset:offset + 2] = f16_bytes([value])
    return w


def reference(qtype: Q, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B, T) float32, from gguf.quants.dequantize with d = 1 (and dmin = 0: scale * value, exact integers)
    and, for Q4_K, d = 0, dmin = 1 (-min): Q4_K d * sumi - dmin * summ, Q6_K d * sum."""
    o = D_OFFSET[qtype]
    d = w[:, o:o + 2].copy().view(np.float16).astype(np.float32)
    scaled = with_f16(w, o, 1.0)
    if qtype == Q.Q4_K:
        scaled = with_f16(scaled, 2, 0.0)
    wq = quants.dequantize(scaled, qtype).reshape(B, QK_K).astype(np.int64)
    sumi = (wq @ x.T.astype(np.int64)).astype(np.float32)
    if qtype == Q.Q6_K:
        return d * sumi
    mins = with_f16(with_f16(w, 0, 0.0), 2, 1.0)
    mn = -quants.dequantize(mins, Q.Q4_K).reshape(B, 8, 32)[:, :, 0].astype(np.int64)
    summ = (mn @ x.reshape(T, 8, 32).astype(np.int64).sum(axis=-1).T).astype(np.float32)
    dmin = w[:, 2:4].copy().view(np.float16).astype(np.float32)
    return d * sumi - dmin * summ


@pytest.mark.parametrize("qtype, x86, n_tok", sorted(cpu_simd.LOWERINGS))
def test_blocks_are_exact(qtype, x86, n_tok):
    skip_unless_host_runs(x86)
    w, x = blocks_and_x(qtype, seed=3)
    bsum = x.reshape(T, 16, 16).sum(axis=-1, dtype=np.int32)
    out = np.full((B, T), np.nan, np.float32)
    runner(qtype, x86, n_tok)(w.reshape(-1), x.reshape(-1), bsum.reshape(-1), out)
    covered = T - T % n_tok  # the tokens whole calls reach
    np.testing.assert_array_equal(out[:, :covered], reference(qtype, w, x)[:, :covered])


@pytest.mark.parametrize("qtype", sorted(D_OFFSET))
@pytest.mark.parametrize("x86", [False, True])
def test_blocks_read_every_fp16_scale(qtype, x86):
    """All 65536 fp16 patterns as d, against a block whose integer sum is 1 (and Q4_K's minimum sum 0): the
    result is d itself (numpy's float16 conversion), subnormals, infinities and NaNs included."""
    skip_unless_host_runs(x86)
    n = 1 << 16
    w = np.zeros((n, GGML_QUANT_SIZES[qtype][1]), np.uint8)
    o = D_OFFSET[qtype]
    w[:, o:o + 2] = np.arange(n, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    x = np.zeros(QK_K, np.int8)
    x[0] = 1
    bsum = np.zeros(16, np.int32)
    if qtype == Q.Q4_K:
        w[:, 4], w[:, 16] = 1, 1  # sub-block 0's scale, first nibble; minimums 0
    else:
        w[:, 0], w[:, 128], w[:, 192] = 1, 2, 1  # first quant 1 | 2 << 4 = 33, scale 1: (33 - 32) * 1
        bsum[0] = 1
    out = np.zeros((n, 1), np.float32)
    runner(qtype, x86, 1)(w.reshape(-1), x, bsum, out)
    expected = np.arange(n, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(out[nan, 0]).all()
    np.testing.assert_array_equal(out[~nan, 0].view(np.uint32), expected[~nan].view(np.uint32))


def test_blocks_reject_non_contiguous_arrays():
    w, x = blocks_and_x(Q.Q4_K, seed=4)
    bsum = x.reshape(T, 16, 16).sum(axis=-1, dtype=np.int32)
    with pytest.raises(Exception, match="q4_k_blocks1"):
        runner(Q.Q4_K, False, 1)(w[:, ::2], x.reshape(-1), bsum.reshape(-1), np.zeros((B, T), np.float32))
