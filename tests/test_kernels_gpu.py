"""Triton GGUF kernels against gguf's dequantizers (the reference) and the CPU kernels, on random blocks.

Without CUDA they run under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET before the
kernels are defined, hence before the import); with CUDA they run on the GPU and carry the `gpu` mark.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants  # noqa: E402

from moe_tier import kernels  # noqa: E402
from moe_tier.errors import MoeTierError  # noqa: E402
from moe_tier.kernels import gpu  # noqa: E402
from moe_tier.kernels.gpu_gemv import has_kernel as gemv_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # `pytest -m gpu` on the GPU machine runs them too
# Relative error of x @ W.T against float64: exact float32 in the interpreter, tf32 dots on the GPU.
TOL = 5e-3 if DEVICE == "cuda" else 1e-5
FP16_TOL = 5e-3  # float16 weights and activations (the prefill path), on either device
# Where each type keeps its f16 scales (d, dmin, m): random bytes there would give inf/NaN or huge values.
F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}
TYPES = sorted(gpu.SUPPORTED)


def random_weight(qtype: Q, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """(N, row_bytes) uint8: random quants and scales with sane f16 block scales."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        return quants.quantize(values, qtype).view(np.uint8).reshape(n_rows, -1) if qtype is not Q.F32 \
            else values.view(np.uint8).reshape(n_rows, -1)
    qk, bb = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_rows, n_cols // qk, bb), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        d = rng.uniform(-0.02, 0.02, (n_rows, n_cols // qk)).astype(np.float16)
        blocks[:, :, at : at + 2] = d.view(np.uint8).reshape(n_rows, n_cols // qk, 2)
    return blocks.reshape(n_rows, -1)


def reference(x: np.ndarray, w: np.ndarray, qtype: Q, n_rows: int, n_cols: int) -> np.ndarray:
    return x.astype(np.float64) @ quants.dequantize(w, qtype).reshape(n_rows, n_cols).astype(np.float64).T


def q8_1(x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's quantize_q8_1 leaves it (blocks of 32: int8 quants times amax / 127 rounded to f16),
    the activations the matrix-vector kernels multiply (kernels.gpu_gemv.has_kernel)."""
    blocks = x.astype(np.float32).reshape(len(x), -1, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    v = blocks / np.where(d == 0, 1, d)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def gemv_reference(x: np.ndarray, w: np.ndarray, qtype: Q, n_rows: int, n_cols: int) -> np.ndarray:
    return reference(q8_1(x) if gemv_kernel(qtype, n_cols) else x, w, qtype, n_rows, n_cols)


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens", [1, 7, 40])
def test_matmul_matches_gguf_dequantize_and_cpu_kernel(qtype, n_tokens):
    """Few tokens: the grouped kernel; from DEQUANT_MIN_ROWS (40 here) float16 weights through cuBLAS."""
    rng = np.random.default_rng([int(qtype), n_tokens])
    n_rows, n_cols = 40, 512  # a partial BLOCK_N tile; two K-quant super-blocks, sixteen Q8_0 blocks per row
    w = random_weight(qtype, n_rows, n_cols, rng)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    got = gpu.matmul(torch.from_numpy(x).to(DEVICE), torch.from_numpy(w.reshape(-1)).to(DEVICE), qtype, n_rows, n_cols)
    got = got.cpu().numpy()
    assert got.shape == (n_tokens, n_rows) and np.isfinite(got).all()
    want = reference(x, w, qtype, n_rows, n_cols)
    assert rel_err(got, want) < (TOL if n_tokens < gpu.DEQUANT_MIN_ROWS else FP16_TOL)
    # The CPU kernels round x as llama.cpp does (to Q8_0/Q8_K for quantized weights): ~1e-2 apart.
    assert rel_err(got, kernels.matmul(x, w, qtype, n_rows, n_cols)) < 3e-2


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("pad", [0, 3], ids=["aligned", "odd offset"])
def test_dequantize_gives_gguf_values_as_float16(qtype, pad):
    """The prefill path's decode: rows 5 .. 5 + 70 of a matrix (two row tiles, the last partial), exactly gguf's
    values rounded to float16."""
    rng = np.random.default_rng(int(qtype) + pad)
    n_rows, n_cols = 80, 512
    w = random_weight(qtype, n_rows, n_cols, rng)
    arena = torch.from_numpy(np.concatenate([np.zeros(pad, np.uint8), w.reshape(-1)])).to(DEVICE)
    got = gpu.dequantize(arena, pad, qtype, n_rows, n_cols, row0=5, rows=70).cpu().numpy()
    want = quants.dequantize(w, qtype).reshape(n_rows, n_cols)[5:75].astype(np.float16)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_activations():
    rng = np.random.default_rng(1)
    w = random_weight(Q.Q4_K, 32, 256, rng)
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32)).to(torch.bfloat16)
    got = gpu.matmul(x.to(DEVICE), torch.from_numpy(w.reshape(-1)).to(DEVICE), Q.Q4_K, 32, 256).cpu().numpy()
    want = reference(x.float().numpy(), w, Q.Q4_K, 32, 256)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("aligned", [False, True], ids=["odd offsets", "aligned"])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.BF16], ids=lambda q: q.name)
def test_grouped_matmul_serves_every_expert_in_one_launch(qtype, aligned):
    """Experts at odd offsets of one arena (read byte-wise), or at multiples of 16 (Q4_K / Q5_K quants read as
    words), tokens grouped by expert (one expert with none, one past a row tile)."""
    rng = np.random.default_rng(int(qtype))
    n_rows, n_cols = 48, 256
    counts = [3, 0, 1, 18, 2]  # rows per expert; 18 spans two BLOCK_T tiles
    weights = [random_weight(qtype, n_rows, n_cols, rng) for _ in counts]
    offsets, arena, at = [], [], 0
    for w in weights:
        pad = 16 * int(rng.integers(1, 4)) if aligned else int(rng.integers(1, 40))
        arena += [np.zeros(pad, np.uint8), w.reshape(-1)]
        offsets.append(at + pad)
        at += pad + w.size
    seg = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = rng.standard_normal((seg[-1], n_cols)).astype(np.float32)
    out = gpu.moe_matmul(
        torch.from_numpy(x).to(DEVICE), torch.from_numpy(np.concatenate(arena)).to(DEVICE),
        torch.tensor(offsets, dtype=torch.int64, device=DEVICE), torch.from_numpy(seg).to(DEVICE),
        max(counts), qtype, n_rows, n_cols, aligned=aligned,
    ).cpu().numpy()
    for e, w in enumerate(weights):
        rows = slice(seg[e], seg[e + 1])
        if counts[e]:
            assert rel_err(out[rows], reference(x[rows], w, qtype, n_rows, n_cols)) < TOL


def test_bad_arguments_raise_moe_tier_error():
    x = torch.zeros((1, 256), device=DEVICE)
    w = torch.zeros(144 * 4, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(MoeTierError, match="needs 576 bytes"):
        gpu.matmul(x, w[:100], Q.Q4_K, 4, 256)
    with pytest.raises(MoeTierError, match="no GPU kernel"):
        gpu.matmul(x, w, Q.IQ2_XXS, 4, 256)
    with pytest.raises(MoeTierError, match="do not match"):
        gpu.matmul(torch.zeros((1, 512), device=DEVICE), w, Q.Q4_K, 4, 256)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_1, Q.F16], ids=lambda q: q.name)
def test_row_length_not_a_multiple_of_the_tile(qtype):
    """K = 96: the last 64-wide K tile is half masked."""
    rng = np.random.default_rng(5)
    w = random_weight(qtype, 17, 96, rng)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    got = gpu.matmul(torch.from_numpy(x).to(DEVICE), torch.from_numpy(w.reshape(-1)).to(DEVICE), qtype, 17, 96)
    assert rel_err(got.cpu().numpy(), reference(x, w, qtype, 17, 96)) < TOL


@pytest.mark.parametrize("block_t,block_n,num_warps", [(16, 64, 4), (16, 128, 8), (64, 64, 8)])
def test_wider_row_tiles(block_t, block_n, num_warps):
    """The tuning knobs: 37 tokens over several token tiles or one wider one, row tiles wider than the 40 rows:
    exactly the outputs that exist are written."""
    rng = np.random.default_rng(block_n)
    w = random_weight(Q.Q4_K, 40, 256, rng)
    x = rng.standard_normal((37, 256)).astype(np.float32)
    seg = torch.tensor([0, 37], dtype=torch.int32, device=DEVICE)
    out = gpu.moe_matmul(torch.from_numpy(x).to(DEVICE), torch.from_numpy(w.reshape(-1)).to(DEVICE),
                         torch.zeros(1, dtype=torch.int64, device=DEVICE), seg, 37, Q.Q4_K, 40, 256,
                         block_n=block_n, num_warps=num_warps, block_t=block_t)
    assert rel_err(out.cpu().numpy(), reference(x, w, Q.Q4_K, 40, 256)) < TOL


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_skipped_rows_read_nothing(qtype):
    """A GPU with no slots has an empty arena (address 0) and skips every row of a layer computed elsewhere: no
    kernel may read from it (a read at offset 0 there was an illegal address on the two-GPU device run)."""
    from moe_tier.kernels.gpu_gemv import SKIP, gemv_parts

    offsets = torch.full((4,), SKIP, dtype=torch.int64, device=DEVICE)
    x = torch.ones((2, 256), device=DEVICE)
    got = gemv_parts(x, torch.empty(0, dtype=torch.uint8, device=DEVICE), offsets, qtype, 32, 256, (0, 4096), x_div=2)
    assert got.shape[0] == 2 and not got.sum(dim=1).any()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("split", [1, 3, None])
def test_gemv_reads_each_rows_own_matrix_and_skips_negative_offsets(qtype, split):
    """Decode's kernel: row r of x times the matrix at base + offsets[r] + part_offset; SKIP gives zeros."""
    from moe_tier.kernels.gpu import _COUNTERS
    from moe_tier.kernels.gpu_gemv import SKIP, gemv

    rng = np.random.default_rng(int(qtype) + 7)
    n_rows, n_cols, pad = 40, 768, 64
    weights = [random_weight(qtype, n_rows, n_cols, rng) for _ in range(2)]
    blob = np.concatenate([np.zeros(pad, np.uint8), weights[0].ravel(), weights[1].ravel()])
    base = torch.from_numpy(blob).to(DEVICE)
    starts = [0, weights[0].size]  # past the pad, which part_offset skips
    order = [1, -1, 0, 1]  # -1: SKIP
    offsets = torch.tensor([starts[i] if i >= 0 else SKIP for i in order], dtype=torch.int64, device=DEVICE)
    x = rng.standard_normal((len(order), n_cols)).astype(np.float32)
    got = gemv(torch.from_numpy(x).to(DEVICE), base, offsets, qtype, n_rows, n_cols, part_offset=pad, split=split)
    got = got.cpu().numpy()
    for r, i in enumerate(order):
        if i < 0:
            assert not got[r].any()
        else:
            want = gemv_reference(x[r : r + 1], weights[i], qtype, n_rows, n_cols)[0]
            assert rel_err(got[r], want) < TOL, (r, i)
    if qtype in (Q.Q4_K, Q.Q5_K):  # two super-blocks loaded before their math: the same sums in the same order
        unrolled = gemv(torch.from_numpy(x).to(DEVICE), base, offsets, qtype, n_rows, n_cols, part_offset=pad,
                        split=split, unroll=2)
        np.testing.assert_allclose(unrolled.cpu().numpy(), got, rtol=1e-6, atol=1e-6)
    # the launch summed its split parts itself and re-armed its tile counters: a second launch sums afresh
    again = gemv(torch.from_numpy(2 * x).to(DEVICE), base, offsets, qtype, n_rows, n_cols, part_offset=pad, split=split)
    np.testing.assert_allclose(again.cpu().numpy(), 2 * got, rtol=1e-5, atol=1e-4)
    assert not any(b.any() for buffers in _COUNTERS.values() for b in buffers)
