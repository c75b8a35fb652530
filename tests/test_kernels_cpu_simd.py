"""cpu_simd's row dots (Q2_K..Q6_K, Q4_0), every lowering (x86 AVX2 + F16C where the host has them, generic vector
IR everywhere; one and four tokens per call), against integer sums built from gguf's dequantizer and numpy's
fp16 conversion.

Shape key: R = 4 weight rows of NB = 3 super-blocks (256 values each), T = 5 tokens (one call of four, one of
one). Row 0 is extreme: every quant at its maximum and every scale at an end of its range, against tokens 0
and 1 all -128 and all 127 (vpmaddubsw's int16 pairs must not saturate).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from numba import njit

from moe_tier.kernels import cpu_simd

QK_K = 256
R, NB, T = 4, 3, 5
# byte offset of the fp16 d (dmin follows it where there is one)
D_OFFSET = {Q.Q2_K: 80, Q.Q3_K: 108, Q.Q4_K: 0, Q.Q5_K: 0, Q.Q6_K: 208}
WITH_MIN = {Q.Q2_K, Q.Q4_K, Q.Q5_K}
EPS32 = 2.0**-24
K_LOWERINGS = sorted(k for k in cpu_simd.LOWERINGS if k[0] != Q.Q4_0)


def runner(qtype: Q, x86: bool, n_tok: int):
    """run(w (R', NB' * block_bytes), x (T', NB' * 256), xd (T', NB'), bsum (T', NB' * 16), out (R', T')):
    every row against every token, n_tok tokens per call."""
    rows = cpu_simd.LOWERINGS[qtype, x86, n_tok]

    @njit
    def run(w, x, xd, bsum, out):
        n_blk = xd.shape[1]
        for r in range(w.shape[0]):
            for t in range(0, x.shape[0] - n_tok + 1, n_tok):
                v = rows(w, r * w.shape[1], n_blk, x, t * x.shape[1], x.shape[1], xd, t * n_blk, n_blk,
                         bsum, t * bsum.shape[1], bsum.shape[1])
                for i in range(n_tok):
                    out[r, t + i] = v[i]

    return run


def skip_unless_host_runs(x86: bool) -> None:
    if x86 and not cpu_simd.HAS_X86:
        pytest.skip("host CPU lacks AVX2 or F16C")


def f16_bytes(values) -> np.ndarray:
    return np.asarray(values, np.float16).view(np.uint8)


def blocks(qtype: Q, rng: np.random.Generator, scales=None) -> np.ndarray:
    """(R, NB, block_bytes) random blocks, row 0 extreme; fp16 fields random in +-0.02, or set to scales."""
    w = rng.integers(0, 256, (R, NB, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    o = D_OFFSET[qtype]
    n_f16 = 2 if qtype in WITH_MIN else 1
    if qtype == Q.Q2_K:
        w[0, :, :80] = 0xFF  # scales and minimums 15, quants 3
    elif qtype == Q.Q3_K:
        w[0, :, :96] = 0xFF  # quants 7 (value 3)
        w[0, 0, 96:108], w[0, 1:, 96:108] = 0x00, 0xFF  # scales -32, 31
    elif qtype in WITH_MIN:
        w[0, :, 4:] = 0xFF  # scales / minimums 63 (all 6-bit fields set), quants 15 (Q4_K) or 31 (Q5_K)
    else:
        w[0, :, :192] = 0xFF  # quants 63
        w[0, 0, 192:208], w[0, 1:, 192:208] = 0x80, 0x7F  # scales -128, 127
    w[:, :, o:o + 2 * n_f16] = f16_bytes(rng.uniform(-0.02, 0.02, (R, NB, n_f16)) if scales is None
                                         else np.broadcast_to(scales, (R, NB, n_f16)))
    return w


def integer_parts(qtype: Q, w: np.ndarray, x: np.ndarray, absolute: bool = False):
    """(sumi, summ) int64 (R, NB, T): sum scale * value * x per block (gguf.quants.dequantize with d = 1, dmin
    = 0), and for Q2_K / Q4_K / Q5_K sum min * x (d = 0, dmin = 1 gives -min); Q3_K's and Q6_K's values include
    their offsets (-4, -32). absolute: sums of |products|, bounds on any partial sum of the kernel's lanes."""
    fold = np.abs if absolute else (lambda v: v)
    o = D_OFFSET[qtype]
    unit = w.copy()
    unit[:, :, o:o + 2] = f16_bytes([1.0])
    if qtype in WITH_MIN:
        unit[:, :, o + 2:o + 4] = f16_bytes([0.0])
    wq = quants.dequantize(unit.reshape(R * NB, -1), qtype).reshape(R, NB, QK_K).astype(np.int64)
    xb = fold(x.reshape(T, NB, QK_K).astype(np.int64))
    sumi = np.einsum("rbk,tbk->rbt", fold(wq), xb)
    if qtype not in WITH_MIN:
        return sumi, np.zeros_like(sumi)
    mins = w.copy()
    mins[:, :, o:o + 4] = f16_bytes([0.0, 1.0])
    mn = -quants.dequantize(mins.reshape(R * NB, -1), qtype).reshape(R, NB, QK_K).astype(np.int64)
    return sumi, np.einsum("rbk,tbk->rbt", fold(mn), xb)


def run_rows(qtype, x86, n_tok, w, x, xd):
    bsum = x.reshape(T, -1, 16).sum(axis=-1, dtype=np.int32)
    out = np.full((R, T), np.nan, np.float32)
    runner(qtype, x86, n_tok)(w.reshape(R, -1), x, xd, bsum, out)
    return out[:, :T - T % n_tok]  # the tokens whole calls reach


@pytest.mark.parametrize("qtype, x86, n_tok", K_LOWERINGS)
def test_rows_are_exact_on_small_integers(qtype, x86, n_tok):
    """d = dmin = d_x = 1 and |x| <= 8: every partial sum is an integer below 2**24, so float32 holds it
    exactly and the row dot must equal the integer one."""
    skip_unless_host_runs(x86)
    rng = np.random.default_rng(5)
    w = blocks(qtype, rng, scales=1.0)
    x = rng.integers(-8, 9, (T, NB * QK_K), dtype=np.int8)
    sumi, summ = integer_parts(qtype, w, x)
    expected = (sumi - summ).sum(axis=1).astype(np.float32)
    np.testing.assert_array_equal(run_rows(qtype, x86, n_tok, w, x, np.ones((T, NB), np.float32)),
                                  expected[:, :T - T % n_tok])


@pytest.mark.parametrize("qtype, x86, n_tok", K_LOWERINGS)
def test_rows_match_the_exact_dot(qtype, x86, n_tok):
    """Random scales, extreme blocks and tokens: within float32 rounding of the exact (float64) dot, relative to
    the sum of |products| (lanes may cancel inside a block: Q3_K's and Q6_K's signed scales)."""
    skip_unless_host_runs(x86)
    rng = np.random.default_rng(3)
    w = blocks(qtype, rng)
    x = rng.integers(-128, 128, (T, NB * QK_K), dtype=np.int8)
    x[0], x[1] = -128, 127
    xd = rng.uniform(0.001, 0.01, (T, NB)).astype(np.float32)
    sumi, summ = integer_parts(qtype, w, x)
    o = D_OFFSET[qtype]
    d = w[:, :, o:o + 2].copy().view(np.float16)[..., 0].astype(np.float64)[..., None]
    dmin = 0
    if qtype in WITH_MIN:
        dmin = w[:, :, o + 2:o + 4].copy().view(np.float16)[..., 0].astype(np.float64)[..., None]
    terms = xd.T.astype(np.float64)[None] * (d * sumi - dmin * summ)
    abs_sumi, abs_summ = integer_parts(qtype, w, x, absolute=True)
    magnitude = (xd.T[None] * (np.abs(d) * abs_sumi + np.abs(dmin) * abs_summ)).sum(axis=1)
    got = run_rows(qtype, x86, n_tok, w, x, xd)
    covered = got.shape[1]
    error = np.abs(got - terms.sum(axis=1)[:, :covered])
    assert (error <= 16 * EPS32 * magnitude[:, :covered]).all(), error / magnitude[:, :covered]


@pytest.mark.parametrize("qtype", sorted(D_OFFSET))
@pytest.mark.parametrize("x86", [False, True])
def test_rows_read_every_fp16_scale(qtype, x86):
    """All 65536 fp16 patterns as d, one block per row whose integer sum is 1 (and the minimums' sum 0),
    d_x = 1: a finite d comes back exactly (subnormals included); an infinite or NaN one gives no finite
    result (its zero lanes make NaN, as ggml's do)."""
    skip_unless_host_runs(x86)
    n = 1 << 16
    w = np.zeros((n, GGML_QUANT_SIZES[qtype][1]), np.uint8)
    o = D_OFFSET[qtype]
    w[:, o:o + 2] = np.arange(n, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    x = np.zeros((1, QK_K), np.int8)
    x[0, 0] = 1
    bsum = np.zeros((1, 16), np.int32)
    if qtype == Q.Q2_K:
        w[:, 0], w[:, 16] = 1, 1  # sub-block 0's scale 1 and minimum 0, first quant 1
    elif qtype == Q.Q3_K:
        w[:, 0], w[:, 32], w[:, 96], w[:, 104] = 1, 1, 1, 2  # first quant 1 | 1 << 2 = 5, scale (1 | 2 << 4) - 32
        bsum[0, 0] = 1  # = 1: (5 - 4) * 1
    elif qtype in WITH_MIN:
        w[:, 4], w[:, 16 if qtype == Q.Q4_K else 48] = 1, 1  # sub-block 0's scale, first nibble; minimums 0
    else:
        w[:, 0], w[:, 128], w[:, 192] = 1, 2, 1  # first quant 1 | 2 << 4 = 33, scale 1: (33 - 32) * 1
        bsum[0, 0] = 1
    out = np.zeros((n, 1), np.float32)
    runner(qtype, x86, 1)(w, x, np.ones((1, 1), np.float32), bsum, out)
    expected = np.arange(n, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(out[finite, 0], expected[finite])
    assert not np.isfinite(out[~finite, 0]).any()


def test_rows_reject_non_contiguous_arrays():
    rng = np.random.default_rng(4)
    w = blocks(Q.Q4_K, rng).reshape(R, -1)
    x = rng.integers(-128, 128, (T, NB * QK_K), dtype=np.int8)
    bsum = x.reshape(T, -1, 16).sum(axis=-1, dtype=np.int32)
    with pytest.raises(Exception, match="q4_k_rows1"):
        runner(Q.Q4_K, False, 1)(w[:, ::2], x, np.ones((T, NB), np.float32), bsum, np.zeros((R, T), np.float32))


def q4_0_runner(x86: bool, n_tok: int):
    """run(w (R', B * 18), x (T', B * 32), xd (T', B), out (R', T')): every row against every token."""
    rows = cpu_simd.LOWERINGS[Q.Q4_0, x86, n_tok]

    @njit
    def run(w, x, xd, out):
        n_blk = xd.shape[1]
        for r in range(w.shape[0]):
            for t in range(0, x.shape[0] - n_tok + 1, n_tok):
                v = rows(w, r * w.shape[1], n_blk, x, t * x.shape[1], x.shape[1], xd, t * n_blk, n_blk)
                for i in range(n_tok):
                    out[r, t + i] = v[i]

    return run


@pytest.mark.parametrize("x86", [False, True])
@pytest.mark.parametrize("n_tok", [1, 4])
def test_q4_0_rows_match_gguf(x86, n_tok):
    """Q4_0 (B = 24 blocks of 32): with d = d_x = 1 the row dot is the integer one exactly (|partial sums| <
    2**24), tokens 0 and 1 all -128 and 127 (ggml's vpsignb would get -128 wrong); with random scales, within
    float32 rounding of the float64 dot of gguf's dequantized rows."""
    skip_unless_host_runs(x86)
    rng = np.random.default_rng(6)
    n_blk = 24
    w = rng.integers(0, 256, (R, n_blk, 18), dtype=np.uint8)
    x = rng.integers(-128, 128, (T, n_blk * 32), dtype=np.int8)
    x[0], x[1] = -128, 127
    w[:, :, :2] = f16_bytes([1.0])
    out = np.full((R, T), np.nan, np.float32)
    q4_0_runner(x86, n_tok)(w.reshape(R, -1), x, np.ones((T, n_blk), np.float32), out)
    wq = quants.dequantize(w.reshape(R, -1), Q.Q4_0).astype(np.int64)
    covered = T - T % n_tok
    np.testing.assert_array_equal(out[:, :covered], (wq @ x.T.astype(np.int64))[:, :covered])

    w[:, :, :2] = f16_bytes(rng.uniform(-0.02, 0.02, (R, n_blk, 1)))
    xd = rng.uniform(0.001, 0.01, (T, n_blk)).astype(np.float32)
    q4_0_runner(x86, n_tok)(w.reshape(R, -1), x, xd, out)
    wf = quants.dequantize(w.reshape(R, -1), Q.Q4_0).astype(np.float64).reshape(R, n_blk, 32)
    products = np.einsum("rbk,tbk->rtbk", wf, x.reshape(T, n_blk, 32) * xd[..., None].astype(np.float64))
    error = np.abs(out - products.sum(axis=(2, 3)))[:, :covered]
    assert (error <= 16 * EPS32 * np.abs(products).sum(axis=(2, 3))[:, :covered]).all()


@pytest.mark.parametrize("x86", [False, True])
def test_q4_0_rows_read_every_fp16_scale(x86):
    """All 65536 fp16 patterns as d, one block whose integer sum is 1 (quant 9 against x = 1), d_x = 1."""
    skip_unless_host_runs(x86)
    n = 1 << 16
    w = np.full((n, 18), 0x88, np.uint8)  # every value 8 - 8 = 0
    w[:, 0:2] = np.arange(n, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    w[:, 2] = 0x89
    x = np.zeros((1, 32), np.int8)
    x[0, 0] = 1
    out = np.zeros((n, 1), np.float32)
    q4_0_runner(x86, 1)(w, x, np.ones((1, 1), np.float32), out)
    expected = np.arange(n, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(out[finite, 0], expected[finite])
    assert not np.isfinite(out[~finite, 0]).any()
