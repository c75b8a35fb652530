"""CPU kernels against gguf's dequantizers and against a slow numpy re-enactment of llama.cpp's CPU matmul.

Shape key: T tokens, K = 512 columns (2 super-blocks, 16 blocks of 32), N = 24 rows (one full and one partial
row task). Every supported type is exercised for T = 1 and T = 5.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from moe_tier import kernels
from moe_tier.errors import MoeTierError
from moe_tier.kernels import activations

N, K = 24, 512
EPS32 = 2.0**-24  # float32 unit roundoff
F16_EPS = 2.0**-11
Q8_0_TYPES = {Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.MXFP4}  # vec_dot_type Q8_0 (ggml-cpu.c type_traits_cpu)
Q8_1_TYPES = {Q.Q4_1, Q.Q5_1}
Q8_K_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS}
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
# fp16 fields of the blocks gguf cannot quantize (ggml-common.h); every other byte pattern is a valid block.
F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,)}
ALL_TYPES = sorted(kernels.SUPPORTED, key=lambda q: q.name)


def make_weight(qtype: Q, seed: int) -> np.ndarray:
    """(N, row_bytes) uint8: gguf-quantized random weights, or random valid blocks where gguf cannot quantize."""
    rng = np.random.default_rng(seed)
    if qtype not in F16_FIELDS:
        data = quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
        return np.ascontiguousarray(data).view(np.uint8).reshape(N, -1)
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (N, K // block_values, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(0.002, 0.02, (N, K // block_values, 1)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8)
    return blocks.reshape(N, -1)


def make_x(n_tok: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n_tok, K)).astype(np.float32)
    if n_tok > 1:
        x[1, :256] = 0.0  # an all-zero block: the d = 0 paths of every quantizer
    return x


# --- llama.cpp's activation conversion, written block by block from the C sources ---------------------------

def nearest_int(f: np.float32) -> int:
    """ggml-quants.c nearest_int: add 1.5 * 2**23 and read the low mantissa bits (ties to even)."""
    bits = int(np.array([np.float32(f) + np.float32(12582912.0)], np.float32).view(np.int32)[0])
    return (bits & 0x007FFFFF) - 0x00400000


def ref_q8_0(x: np.ndarray):
    """quantize_row_q8_0, x86 AVX branch (ggml-cpu/arch/x86/quants.c). Returns qs, d (fp16 value), s (Q8_1)."""
    n_tok, n_blk = x.shape[0], x.shape[1] // 32
    qs = np.zeros(x.shape, np.int8)
    d16 = np.zeros((n_tok, n_blk), np.float32)
    s16 = np.zeros((n_tok, n_blk), np.float32)
    for t in range(n_tok):
        for b in range(n_blk):
            v = x[t, 32 * b:32 * b + 32]
            amax = np.float32(np.abs(v).max())
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(np.float32(127.0) / amax) if amax != 0 else np.float32(0.0)
            q = np.rint(v * inv)  # _mm256_round_ps(_MM_ROUND_NEAREST)
            qs[t, 32 * b:32 * b + 32] = q
            d16[t, b] = np.float16(d)
            s16[t, b] = np.float16(np.float32(d * np.float32(int(q.sum()))))
    return qs, d16, s16


def ref_q8_k(x: np.ndarray):
    """quantize_row_q8_K_ref (ggml-quants.c). Returns qs, d (float32), bsums."""
    n_tok, n_blk = x.shape[0], x.shape[1] // 256
    qs = np.zeros(x.shape, np.int8)
    d = np.zeros((n_tok, n_blk), np.float32)
    for t in range(n_tok):
        for b in range(n_blk):
            v = x[t, 256 * b:256 * b + 256]
            amax, vmax = np.float32(0.0), np.float32(0.0)
            for value in v:
                if abs(value) > amax:
                    amax, vmax = abs(value), value
            if amax == 0:
                continue
            iscale = np.float32(np.float32(-127.0) / vmax)
            qs[t, 256 * b:256 * b + 256] = [min(127, nearest_int(np.float32(iscale * value))) for value in v]
            d[t, b] = np.float32(np.float32(1.0) / iscale)
    return qs, d, qs.reshape(n_tok, -1, 16).astype(np.int32).sum(axis=-1)


def ref_bf16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_BF16 for finite values: round the upper 16 bits to nearest even."""
    u = x.view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def llama_cpp_emulation(x: np.ndarray, w: np.ndarray, qtype: Q):
    """(y, magnitude): llama.cpp's result computed exactly in float64, and sum |terms| for the rounding bound.

    With x in its vec_dot_type, llama.cpp's per-block integer dots times the scales equal x_deq . w_deq exactly
    in real arithmetic (w_deq from gguf, the reference dequantizer); the one exception is Q8_1's block sum `s`,
    rounded to fp16 once per block and multiplied by the weight block's minimum m (Q4_1, Q5_1)."""
    w_deq = quants.dequantize(w, qtype).astype(np.float64)
    if qtype in FLOAT_TYPES:
        widen = {Q.F32: lambda v: v, Q.F16: lambda v: v.astype(np.float16).astype(np.float32), Q.BF16: ref_bf16}
        x_deq = widen[qtype](x).astype(np.float64)
    elif qtype in Q8_K_TYPES:
        qs, d, _ = ref_q8_k(x)
        x_deq = (qs.reshape(x.shape[0], -1, 256) * d[..., None].astype(np.float64)).reshape(x.shape)
    else:
        qs, d16, s16 = ref_q8_0(x)
        x_deq = (qs.reshape(x.shape[0], -1, 32) * d16[..., None].astype(np.float64)).reshape(x.shape)
    y = x_deq @ w_deq.T
    magnitude = np.abs(x_deq) @ np.abs(w_deq).T
    if qtype in Q8_1_TYPES:
        m = w.reshape(N, -1, GGML_QUANT_SIZES[qtype][1])[:, :, 2:4].copy().view(np.float16)[..., 0]
        exact_sums = qs.reshape(x.shape[0], -1, 32).astype(np.float64).sum(axis=-1) * d16
        y += (s16 - exact_sums) @ m.astype(np.float64).T
        magnitude += np.abs(s16) @ np.abs(m.astype(np.float64)).T
    return y, magnitude


# --- tests ----------------------------------------------------------------------------------------------------

def test_supported_types_are_the_required_ones():
    required = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert required <= kernels.SUPPORTED
    assert kernels.block_shape(Q.Q4_K) == GGML_QUANT_SIZES[Q.Q4_K]
    assert kernels.row_bytes(Q.Q4_K, 4096) == 16 * 144


def test_activation_quantizers_match_the_c_reference():
    x = make_x(5, seed=1)
    x[3, :256] = np.arange(256) % 8 - 3.5  # Q8_K: -3.5 and 3.5 tie for the max; the first (-3.5) sets the sign
    x[4, :256] = np.where(np.arange(256) == 7, 127.0, np.arange(256) % 3 + 0.5)  # iscale = -1: exact .5 ties
    x[4, 256:288] = np.where(np.arange(32) == 0, 127.0, np.arange(32) % 4 - 1.5)  # Q8_0 id = 1: .5 ties
    qs, d16, s16 = ref_q8_0(x)
    got = activations.quantize_q8_1(x)
    np.testing.assert_array_equal(got.qs, qs)
    np.testing.assert_array_equal(got.d, d16)
    np.testing.assert_array_equal(got.extra, s16)
    np.testing.assert_array_equal(activations.quantize_q8_0(x).qs, qs)
    qs, d, bsums = ref_q8_k(x)
    got = activations.quantize_q8_k(x)
    np.testing.assert_array_equal(got.qs, qs)
    np.testing.assert_array_equal(got.d, d)
    np.testing.assert_array_equal(got.extra, bsums)
    np.testing.assert_array_equal(activations.to_bf16(x), ref_bf16(x))


@pytest.mark.parametrize("n_tok", [1, 5])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matmul_is_llama_cpp_algorithm(qtype, n_tok):
    """Equal to the exact emulation up to float32 rounding of the block combination: each block adds at most
    a few float32 roundings of its term and the running sum, so |error| <= c * (blocks + 4) * 2**-24 * sum|terms|
    with c = 64 to cover cancellation between a K-quant block's scale and minimum parts. A wrong block layout
    or activation rounding gives errors of order sum|terms| itself, ~10**4 times larger."""
    w, x = make_weight(qtype, seed=2), make_x(n_tok, seed=3)
    y = kernels.matmul(x, w, qtype, N, K)
    assert y.shape == (n_tok, N) and y.dtype == np.float32
    expected, magnitude = llama_cpp_emulation(x, w, qtype)
    n_terms = K if qtype in FLOAT_TYPES else K // 32  # float kernels sum every product in float32
    assert np.all(np.abs(y - expected) <= 64 * (n_terms + 4) * EPS32 * magnitude + 1e-30)


@pytest.mark.parametrize("n_tok", [1, 5])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matmul_matches_float_reference(qtype, n_tok):
    """Against x @ dequantize(w).T in float64, the error is the activation rounding llama.cpp also makes:
    Q8_0/Q8_1: |x - d16 * q| <= d/2 + 127 * 2**-11 * d < 0.57 d per value (d = amax/127, fp16-rounded);
    Q8_1 adds |m| * |fp16(d * sum q) - sum x| <= |m| * (16.01 d + 2**-11 * (sum|x| + 16 d)) per block;
    Q8_K: |x - d * q| <= 0.51 |d| (d float32); F16 / BF16: 2**-11 / 2**-8 relative; plus float32 summation."""
    w, x = make_weight(qtype, seed=4), make_x(n_tok, seed=5)
    y = kernels.matmul(x, w, qtype, N, K).astype(np.float64)
    w_deq = quants.dequantize(w, qtype).astype(np.float64)
    x64 = x.astype(np.float64)
    reference = x64 @ w_deq.T
    abs_products = np.abs(x64) @ np.abs(w_deq).T
    if qtype in FLOAT_TYPES:
        bound = ({Q.F32: 0.0, Q.F16: F16_EPS, Q.BF16: 2.0**-8}[qtype] + 2 * (K + 4) * EPS32) * abs_products
    else:
        block_values = 256 if qtype in Q8_K_TYPES else 32
        xb = np.abs(x64).reshape(n_tok, -1, block_values)
        d = xb.max(axis=-1) / 127  # |d| for Q8_0 / Q8_1 / Q8_K alike
        wb = np.abs(w_deq).reshape(N, -1, block_values).sum(axis=-1)
        bound = (0.57 if block_values == 32 else 0.51) * d @ wb.T
        if qtype in Q8_1_TYPES:
            m = np.abs(w.reshape(N, -1, GGML_QUANT_SIZES[qtype][1])[:, :, 2:4].copy().view(np.float16)[..., 0])
            bound += (16.1 * d + F16_EPS * xb.sum(axis=-1)) @ m.astype(np.float64).T
        bound += 64 * (K // 32 + 4) * EPS32 * abs_products
    assert np.all(np.abs(y - reference) <= bound + 1e-30)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_get_rows_is_gguf_dequantize(qtype):
    w = make_weight(qtype, seed=6)
    rows = np.array([3, 0, 23, 3])
    expected = quants.dequantize(w, qtype)[rows]
    got = kernels.get_rows(w, qtype, K, rows)
    assert got.dtype == np.float32 and got.shape == (4, K)
    np.testing.assert_array_equal(got, expected)


def test_typed_float16_weight_is_taken_as_its_bytes():
    w, x = make_weight(Q.F16, seed=7), make_x(2, seed=8)
    np.testing.assert_array_equal(kernels.matmul(x, w.view(np.float16), Q.F16, N, K), kernels.matmul(x, w, Q.F16, N, K))


def test_unsupported_type_raises():
    x = make_x(1, seed=9)
    with pytest.raises(MoeTierError, match="unsupported quant type IQ2_XXS"):
        kernels.matmul(x, np.zeros(N * 66 * 2, np.uint8), Q.IQ2_XXS, N, K)
    with pytest.raises(MoeTierError, match="unsupported quant type IQ2_XXS"):
        kernels.get_rows(np.zeros(N * 66 * 2, np.uint8), Q.IQ2_XXS, K, np.array([0]))


def test_wrong_sizes_raise():
    w, x = make_weight(Q.Q8_0, seed=10), make_x(1, seed=11)
    with pytest.raises(MoeTierError, match="needs"):
        kernels.matmul(x, w[:-1], Q.Q8_0, N, K)
    with pytest.raises(MoeTierError, match="do not match"):
        kernels.matmul(x[:, :256], w, Q.Q8_0, N, K)
    with pytest.raises(MoeTierError, match="multiple"):
        kernels.matmul(make_x(1, seed=12)[:, :100], w, Q.Q4_K, N, 100)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_converted_activations_give_the_same_products(qtype):
    """x converted once and shared (by several weights, then by a subset of its tokens) changes no result bit."""
    w, w2, x = make_weight(qtype, seed=13), make_weight(qtype, seed=14), make_x(5, seed=15)
    acts = activations.Activations(x)
    np.testing.assert_array_equal(kernels.matmul(acts, w, qtype, N, K), kernels.matmul(x, w, qtype, N, K))
    np.testing.assert_array_equal(kernels.matmul(acts, w2, qtype, N, K), kernels.matmul(x, w2, qtype, N, K))
    tokens = np.array([4, 1])
    np.testing.assert_array_equal(kernels.matmul(acts.rows(tokens), w, qtype, N, K),
                                  kernels.matmul(x[tokens], w, qtype, N, K))


def test_activations_convert_once_per_activation_type():
    calls = []

    def prepare(x):
        calls.append(len(x))
        return (x * 2,)

    acts = activations.Activations(make_x(3, seed=16))
    first = acts.converted(prepare)
    assert acts.converted(prepare) is first and calls == [3]
    np.testing.assert_array_equal(acts.rows(np.array([2])).converted(prepare)[0], first[0][[2]])
    assert calls == [3]


def test_from_f16_is_exact_for_every_bit_pattern():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 2, 128)
    np.testing.assert_array_equal(activations.from_f16(every), every.astype(np.float32))


def test_to_f16_is_numpys_cast():
    """Every sign and exponent, with mantissas on each side of every rounding boundary (ties included): normal,
    subnormal and overflowing f16 results, infinities and NaN payloads."""
    kept = np.arange(0, 1 << 10, 8, dtype=np.uint32) << np.uint32(13)
    cut = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000 - 1, 0x3000, 0x3001], np.uint32)
    exponents = np.arange(512, dtype=np.uint32) << np.uint32(23)  # sign bit included
    bits = (exponents[:, None] | (kept[:, None] | cut[None, :]).reshape(1, -1)).reshape(-1)
    x = bits.view(np.float32)
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(activations.to_f16(x).view(np.uint32), expected.view(np.uint32))


_SAME_BITS_SCRIPT = """
import sys, numpy as np
from gguf import GGMLQuantizationType as Q, quants
from moe_tier import kernels
rng = np.random.default_rng(0)
w = quants.quantize(rng.standard_normal((128, 2048)).astype(np.float32), Q.Q8_0).view(np.uint8).reshape(128, -1)
np.save(sys.argv[1], kernels.matmul(rng.standard_normal((3, 2048)).astype(np.float32), w, Q.Q8_0, 128, 2048))
"""


def test_q8_0_gives_the_same_bits_compiled_or_loaded_from_numbas_cache(tmp_path):
    """With fastmath's reassociation LLVM summed the blocks in another order when the kernel was compiled in the
    process than when numba loaded it from its cache (1e-7 apart): the first run compiles, the second loads."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    for run in ("compiled", "cached"):
        subprocess.run([sys.executable, "-c", _SAME_BITS_SCRIPT, str(tmp_path / f"{run}.npy")], env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "compiled.npy"), np.load(tmp_path / "cached.npy"))
