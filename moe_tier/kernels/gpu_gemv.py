"""Decode-time matrix-vector products on GGUF blocks: each row of x has its own matrix, found by address.

Shape key: R rows (token x selected expert at decode, or the tokens of a dense matmul), K = n_cols (reduced),
N = n_rows (outputs), S split-K parts, M matrices per row (gate and up of one expert share a launch).
  x        (R / x_div, K) float32: row r multiplies x[r // x_div] (a token's k experts share its row)
  base     (B,)    uint8   any tensor the kernel may address from: row r's matrix starts at base + offsets[r]
  offsets  (R,)    int64   byte offsets from base (plus part_offset, the matrix's place in an expert's blob);
                           they may point outside base's allocation, into pinned host memory (the warm tier),
                           which the GPU then reads over PCIe with no copy and no sync; SKIP skips the row (its
                           output is 0: another GPU computes it)
  parts    (M, S, R, N) float32: gemv_parts' split-K partial sums, for a consumer that sums them itself

At batch 1 a token needs a few matrices read once each, so the kernel should be bound by bandwidth. As
llama.cpp's mmvq: the activations are quantized to q8_1 (32 int8 values and an f16 scale a block,
quantize_q8_1), and one dp4a multiplies four weight nibbles by four int8 activations and adds them; sub-block
scales and minimums apply to the integer sub-block sums. Q4_K quants are addressed as 32-bit words, one
super-block (256 values, 144 bytes) of BLOCK_N rows per step, through word pointers: the compiler then sees
runs of eight contiguous, 16-byte aligned words and issues 128-bit loads. With byte pointers cast to words it
issued one 32-bit load per word and the kernel read ~1.1 TB/s on an H100; with 128-bit loads ~2.3 TB/s
(bench/gpu_gemv.py, timed in a CUDA graph). Q5_K is Q4_K with a fifth bit per value; Q6_K (210-byte blocks)
and Q8_0 (34) are only 2-byte aligned, so they are read as 16-bit halfwords. Other types go through kernels.gpu's grouped kernel (one expert per row).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from moe_tier.kernels.gpu import SKIP, SKIP_C, counters, moe_matmul
from moe_tier.kernels.gpu_q8_1 import dp4a, quantize_q8_1

QK_K = 256
BLOCK_N, NUM_WARPS, STAGES = 8, 1, 1  # the fastest of bench/gpu_gemv.py's sweep on an H100 (gate + up, then down)
TARGET_PROGRAMS = 4096  # split-K up to this many programs: enough in flight to hide HBM (and PCIe) latency
UNROLL = 1  # Q4_K / Q5_K super-blocks a program loads before their math
# Cards whose sweep found another tile faster: (rows a program, warps, programs split-K aims at, unroll). On an H200
# the sweep read 2,903 GB/s at 16 / 1 / 2048 against 2,714 at the H100's tile, which the H100 ranks first; loading
# two super-blocks before their math, 2,957 against 2,907 in one sweep (2,867 against 2,751 at 16 / 1 / 4096).
TILES = {"NVIDIA H200": (16, 1, 2048, 2)}


@triton.jit
def _byte(u0, u1, u2, j):
    """Byte j (0..11, a tensor) of the 12 scale bytes held as three little-endian words."""
    word = tl.where(j < 4, u0, tl.where(j < 8, u1, u2))
    return (word >> (8 * (j % 4))) & 255


@triton.jit
def _words4(hdr):
    """The four columns of a (BLOCK_N, 4) tensor of words, taken apart by masked sums (no layout shuffles)."""
    i = tl.arange(0, 4)[None, :]
    return (tl.sum(tl.where(i == 0, hdr, 0), axis=1), tl.sum(tl.where(i == 1, hdr, 0), axis=1),
            tl.sum(tl.where(i == 2, hdr, 0), axis=1), tl.sum(tl.where(i == 3, hdr, 0), axis=1))


@triton.jit
def _program(off_ptr, p0, p1, SPLIT: tl.constexpr, X_DIV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n tile, row, matrix * SPLIT + part): its row r, split part, matrix, output rows n, the row's matrix
    offset and part offset, and the row of x it multiplies."""
    r = tl.program_id(1)
    part = tl.program_id(2) % SPLIT
    mat = tl.program_id(2) // SPLIT
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offset = tl.multiple_of(tl.load(off_ptr + r), 16)  # slots, blobs and matrices are 16-byte aligned: wide loads
    return r, part, mat, n, offset, tl.where(mat == 0, p0, p1), (r // X_DIV).to(tl.int64)


@triton.jit
def _finish(total, out_ptr, sum_ptr, cnt_ptr, mat, part, r, n, nmask, N, stride_out, stride_part, stride_mat,
            SPLIT: tl.constexpr, REDUCE: tl.constexpr):
    """Store the program's part. REDUCE: the tile's last part to arrive (a counter per tile, re-armed to 0 for the
    next launch or graph replay) also sums the parts in order into sum[matrix, row, n], so that no reduction
    launch follows the product (at batch 1 such a launch and its gap cost about what a small matrix does)."""
    at = out_ptr + mat * stride_mat + r.to(tl.int64) * stride_out + n
    tl.store(at + part * stride_part, total, mask=nmask)
    if REDUCE:
        tl.debug_barrier()  # every thread's store before the counter moves (the atomic releases them to the GPU)
        tile = (mat * tl.num_programs(1) + r) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(cnt_ptr + tile, 1) == SPLIT - 1:
            acc = tl.zeros_like(total)
            for p in range(SPLIT):  # from L2: another SM wrote them
                acc += tl.load(at + p * stride_part, mask=nmask, other=0.0, cache_modifier=".cg")
            tl.store(sum_ptr + (mat * tl.num_programs(1) + r).to(tl.int64) * N + n, acc, mask=nmask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _q4_k_load(w_rows, xq_words, xd_ptr, xs_ptr, x_row, sb, nmask, K: tl.constexpr, Q5: tl.constexpr):
    """Super-block sb of the tile's rows and the activations it multiplies, loaded and nothing computed from them:
    the caller issues the loads of several super-blocks before their math (HBM latency hides behind more bytes
    in flight). Past the row's end everything loads as 0, which adds 0."""
    c = tl.arange(0, 4)  # 64-value chunk: sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
    w = tl.arange(0, 8)  # word in the chunk's 32 quant bytes
    word_at = (12 if Q5 else 4) + 8 * c[:, None] + w[None, :]  # (4, 8) word offsets of the nibbles in a block
    ok = sb < K // 256
    m = nmask & ok
    bp = w_rows + sb * (44 if Q5 else 36)
    q = tl.load(bp[:, None, None] + word_at[None, :, :], mask=m[:, None, None], other=0)  # (BLOCK_N, 4, 8)
    if Q5:  # bit s of qh[l] is the fifth bit of value l of sub-block s
        qh = tl.load(bp[:, None, None] + 4 + w[None, None, :], mask=m[:, None, None], other=0)  # (BLOCK_N, 1, 8)
    else:
        qh = q  # unused
    hdr = tl.load(bp[:, None] + tl.arange(0, 4)[None, :], mask=m[:, None], other=0)  # d | dmin, 12 scale bytes
    x_words = xq_words + sb * 64 + 16 * c[:, None] + w[None, :]  # (4, 8): low nibbles' words, high at + 8
    x_blocks = x_row * (K // 32) + sb * 8 + 2 * c  # (4,) the low nibbles' q8_1 blocks, high at + 1
    return (q, qh, hdr, tl.load(x_words, mask=ok, other=0), tl.load(x_words + 8, mask=ok, other=0),
            tl.load(xd_ptr + x_blocks, mask=ok, other=0.0), tl.load(xd_ptr + x_blocks + 1, mask=ok, other=0.0),
            tl.load(xs_ptr + x_blocks, mask=ok, other=0.0), tl.load(xs_ptr + x_blocks + 1, mask=ok, other=0.0))


@triton.jit
def _q4_k_dot(q, qh, hdr, xw0, xw1, xd0, xd1, xs0, xs1, acc, acc_min, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
              Q5: tl.constexpr):
    """acc, acc_min plus one loaded super-block's products (_q4_k_load's values)."""
    c = tl.arange(0, 4)
    u, u0, u1, u2 = _words4(hdr)
    u0, u1, u2 = u0[:, None], u1[:, None], u2[:, None]
    d = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((u >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    xws, xds, xss = (xw0, xw1), (xd0, xd1), (xs0, xs1)
    for h in tl.static_range(2):
        s = 2 * c + h  # (4,) sub-block index
        xw, xd, xs = xws[h], xds[h], xss[h]
        nib = (q >> (4 * h)) & 0x0F0F0F0F
        if Q5:
            nib = nib | (((qh >> s[None, :, None]) & 0x01010101) << 4)
        dot = tl.sum(dp4a(nib, tl.broadcast_to(xw[None, :, :], (BLOCK_N, 4, 8)), tl.zeros_like(nib), ASM), axis=2)
        lo = s[None, :] < 4
        b_s = _byte(u0, u1, u2, s[None, :])
        b_s4 = _byte(u0, u1, u2, s[None, :] + 4)
        b_sm4 = _byte(u0, u1, u2, tl.where(lo, s[None, :], s[None, :] - 4))
        sc = tl.where(lo, b_s & 63, (b_s4 & 15) | ((b_sm4 >> 6) << 4))
        mn = tl.where(lo, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4)).to(tl.float32)
        acc += d[:, None] * xd[None, :] * (dot * sc).to(tl.float32)
        acc_min += dmin[:, None] * mn * xs[None, :]
    return acc, acc_min


@triton.jit
def _q4_k_gemv(xq_ptr, xd_ptr, xs_ptr, base_ptr, off_ptr, p0, p1, out_ptr, sum_ptr, cnt_ptr, N, stride_out, stride_part,
               stride_mat, K: tl.constexpr, SPLIT: tl.constexpr, X_DIV: tl.constexpr, BLOCK_N: tl.constexpr,
               STAGES: tl.constexpr, ASM: tl.constexpr, REDUCE: tl.constexpr, UNROLL: tl.constexpr = 1,
               Q5: tl.constexpr = False):
    """Program (n tile, row, matrix * SPLIT + part): out[matrix, part, row, n] = sum over the part's super-blocks
    of x[row // X_DIV] . W[n], W the row's matrix at part offset p0 (matrix 0) or p1 (matrix 1), x as q8_1.
    UNROLL (1 or 2): super-blocks loaded before the first one's math.
    Q5: Q5_K, whose blocks (176 bytes) hold a fifth bit per value (qh[32]) between the scales and the nibbles."""
    r, part, mat, n, offset, part_offset, x_row = _program(off_ptr, p0, p1, SPLIT, X_DIV, BLOCK_N)
    nmask = n < N
    row_words = (K // 256) * (44 if Q5 else 36)  # 176 or 144 bytes a super-block
    # Word pointers (not byte pointers cast late) so that the compiler sees runs of contiguous, 16-byte aligned words
    # and loads them 128 bits at a time.
    mat_words = (base_ptr + (offset + part_offset)).to(tl.pointer_type(tl.int32), bitcast=True)
    w_rows = mat_words + n.to(tl.int64) * row_words  # (BLOCK_N,) int32 pointers
    xq_words = (xq_ptr + x_row * K).to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    acc_min = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    if offset != SKIP_C:  # a SKIP row (another GPU's, or staged later) reads nothing, stores 0
        for first in tl.range(0, K // 256, SPLIT * UNROLL, num_stages=STAGES):
            q, qh, hdr, xw0, xw1, xd0, xd1, xs0, xs1 = _q4_k_load(w_rows, xq_words, xd_ptr, xs_ptr, x_row,
                                                                  first + part, nmask, K, Q5)
            if UNROLL == 2:
                q_, qh_, hdr_, xw0_, xw1_, xd0_, xd1_, xs0_, xs1_ = _q4_k_load(
                    w_rows, xq_words, xd_ptr, xs_ptr, x_row, first + SPLIT + part, nmask, K, Q5)
            acc, acc_min = _q4_k_dot(q, qh, hdr, xw0, xw1, xd0, xd1, xs0, xs1, acc, acc_min, BLOCK_N, ASM, Q5)
            if UNROLL == 2:
                acc, acc_min = _q4_k_dot(q_, qh_, hdr_, xw0_, xw1_, xd0_, xd1_, xs0_, xs1_, acc, acc_min, BLOCK_N,
                                         ASM, Q5)
    _finish(tl.sum(acc, axis=1) - tl.sum(acc_min, axis=1), out_ptr, sum_ptr, cnt_ptr, mat, part, r, n, nmask, N,
            stride_out, stride_part, stride_mat, SPLIT, REDUCE)


@triton.jit
def _q6_k_gemv(xq_ptr, xd_ptr, xs_ptr, base_ptr, off_ptr, p0, p1, out_ptr, sum_ptr, cnt_ptr, N, stride_out, stride_part,
               stride_mat, K: tl.constexpr, SPLIT: tl.constexpr, X_DIV: tl.constexpr, BLOCK_N: tl.constexpr,
               STAGES: tl.constexpr, ASM: tl.constexpr, REDUCE: tl.constexpr):
    """As _q4_k_gemv for Q6_K (ql[128] low nibbles | qh[64] high bit pairs | scales[16] int8 | d f16, 210 bytes):
    blocks are only 2-byte aligned, so they are read as 16-bit halfwords, paired into words in registers. As
    llama.cpp's vec_dot_q6_K_q8_1: dp4a of the unsigned 6-bit quants, minus 32 times the activations' sum."""
    r, part, mat, n, offset, part_offset, x_row = _program(off_ptr, p0, p1, SPLIT, X_DIV, BLOCK_N)
    nmask = n < N
    row_halves = (K // 256) * 105
    w_rows = (base_ptr + (offset + part_offset)).to(tl.pointer_type(tl.int16), bitcast=True) + n.to(tl.int64) * row_halves
    c = tl.arange(0, 4)  # chunk: half c // 2 of the block (128 values), ql bytes 64 (c // 2) + 32 (c % 2) ..
    t = tl.arange(0, 8)  # word of the chunk
    i2 = tl.arange(0, 2)  # halfword of the word
    pair = 2 * t[None, :, None] + i2[None, None, :]
    ql_at = (32 * (c // 2) + 16 * (c % 2))[:, None, None] + pair  # (4, 8, 2) halfword offsets in a block
    qh_at = (64 + 16 * tl.arange(0, 2))[:, None, None] + pair  # (2, 8, 2): qh bytes of each half (its two chunks')
    xq_words = (xq_ptr + x_row * K).to(tl.pointer_type(tl.int32), bitcast=True)
    ones = tl.full((4, 8), 0x01010101, tl.int32)
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    if offset != SKIP_C:
        for first in tl.range(0, K // 256, SPLIT, num_stages=STAGES):
            sb = first + part
            m = nmask & (sb < K // 256)
            ok = sb < K // 256
            bp = w_rows + sb * 105
            m4 = m[:, None, None, None]
            qlw = _words(tl.load(bp[:, None, None, None] + ql_at[None], mask=m4, other=0))  # (BLOCK_N, 4, 8)
            qhw = _words(tl.load(bp[:, None, None, None] + qh_at[None], mask=m4, other=0))  # (BLOCK_N, 2, 8)
            qhw = tl.reshape(tl.broadcast_to(qhw[:, :, None, :], (BLOCK_N, 2, 2, 8)), (BLOCK_N, 4, 8))  # per chunk
            d = tl.load(bp + 104, mask=m, other=0).to(tl.float16, bitcast=True).to(tl.float32)
            for h in tl.static_range(2):  # sub-block j = c % 2 + 2 h of half c // 2: 32 values, two scales
                j = c % 2 + 2 * h
                q = ((qlw >> (4 * h)) & 0x0F0F0F0F) | (((qhw >> (2 * j)[None, :, None]) & 0x03030303) << 4)
                xw = tl.load(xq_words + sb * 64 + (32 * (c // 2) + 8 * j)[:, None] + t[None, :], mask=ok, other=0)
                dot = dp4a(q, tl.broadcast_to(xw[None], (BLOCK_N, 4, 8)), tl.zeros_like(q), ASM)
                xsum = dp4a(ones, xw, tl.zeros_like(xw), ASM)
                halves = (tl.sum(tl.reshape(dot, (BLOCK_N, 4, 2, 4)), axis=3)
                          - 32 * tl.sum(tl.reshape(xsum, (4, 2, 4)), axis=2)[None])  # (BLOCK_N, 4, 2): 16 values each
                sc2 = tl.load(bp[:, None] + (96 + 4 * (c // 2) + j)[None, :], mask=m[:, None], other=0).to(tl.int32)
                sc = ((sc2[:, :, None] << (24 - 8 * i2)[None, None, :]) >> 24)  # the two int8 scales, sign-extended
                xd = tl.load(xd_ptr + x_row * (K // 32) + sb * 8 + 4 * (c // 2) + j, mask=ok, other=0.0)
                acc += d[:, None] * xd[None, :] * tl.sum(sc * halves, axis=2).to(tl.float32)
    _finish(tl.sum(acc, axis=1), out_ptr, sum_ptr, cnt_ptr, mat, part, r, n, nmask, N, stride_out, stride_part,
            stride_mat, SPLIT, REDUCE)


@triton.jit
def _q8_0_gemv(xq_ptr, xd_ptr, xs_ptr, base_ptr, off_ptr, p0, p1, out_ptr, sum_ptr, cnt_ptr, N, stride_out, stride_part,
               stride_mat, K: tl.constexpr, SPLIT: tl.constexpr, X_DIV: tl.constexpr, BLOCK_N: tl.constexpr,
               STAGES: tl.constexpr, ASM: tl.constexpr, REDUCE: tl.constexpr):
    """As _q4_k_gemv for Q8_0 (d f16 | qs[32] int8, 34 bytes, 2-byte aligned: read as halfwords), eight blocks
    (256 values) a step: dp4a of the int8 quants, times both scales, as llama.cpp's vec_dot_q8_0_q8_1."""
    r, part, mat, n, offset, part_offset, x_row = _program(off_ptr, p0, p1, SPLIT, X_DIV, BLOCK_N)
    nmask = n < N
    w_rows = (base_ptr + (offset + part_offset)).to(tl.pointer_type(tl.int16), bitcast=True) + n.to(tl.int64) * ((K // 32) * 17)
    b = tl.arange(0, 8)  # block of the step
    t = tl.arange(0, 8)  # word of the block's quants
    q_at = (17 * b + 1)[:, None, None] + 2 * t[None, :, None] + tl.arange(0, 2)[None, None, :]  # (8, 8, 2) halfwords
    xq_words = (xq_ptr + x_row * K).to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BLOCK_N, 8), dtype=tl.float32)
    if offset != SKIP_C:
        for first in tl.range(0, K // 256, SPLIT, num_stages=STAGES):
            step = first + part
            m = nmask & (step < K // 256)
            ok = step < K // 256
            bp = w_rows + step * (8 * 17)
            q = _words(tl.load(bp[:, None, None, None] + q_at[None], mask=m[:, None, None, None], other=0))  # (BLOCK_N, 8, 8)
            d = tl.load(bp[:, None] + 17 * b[None, :], mask=m[:, None], other=0).to(tl.float16, bitcast=True).to(tl.float32)
            xw = tl.load(xq_words + step * 64 + 8 * b[:, None] + t[None, :], mask=ok, other=0)  # (8, 8)
            xd = tl.load(xd_ptr + x_row * (K // 32) + step * 8 + b, mask=ok, other=0.0)
            dot = tl.sum(dp4a(q, tl.broadcast_to(xw[None], (BLOCK_N, 8, 8)), tl.zeros_like(q), ASM), axis=2)
            acc += d * xd[None, :] * dot.to(tl.float32)
    _finish(tl.sum(acc, axis=1), out_ptr, sum_ptr, cnt_ptr, mat, part, r, n, nmask, N, stride_out, stride_part,
            stride_mat, SPLIT, REDUCE)


@triton.jit
def _words(halves):
    """(..., 2) 16-bit halfwords (little-endian pairs) -> (...) 32-bit words."""
    return tl.sum((halves.to(tl.int32) & 0xFFFF) << (16 * tl.arange(0, 2)), axis=len(halves.shape) - 1)


# The types with a matrix-vector kernel: the kernel and its type's constants.
KERNELS = {Q.Q4_K: (_q4_k_gemv, {}), Q.Q5_K: (_q4_k_gemv, {"Q5": True}), Q.Q6_K: (_q6_k_gemv, {}),
           Q.Q8_0: (_q8_0_gemv, {})}  # each steps over 256 values: a row of another length takes the grouped kernel


def has_kernel(qtype: Q, n_cols: int) -> bool:
    """Whether a matrix of this type and row length has a matrix-vector kernel (else: the grouped kernel)."""
    return Q(qtype) in KERNELS and n_cols % QK_K == 0


@functools.cache
def _tile_of(name: str) -> tuple[int, int, int, int]:
    return TILES.get(name, (BLOCK_N, NUM_WARPS, TARGET_PROGRAMS, UNROLL))


def tile(device: torch.device | None) -> tuple[int, int, int, int]:
    """(rows a program, warps, programs split-K aims at, unroll) of the decode kernels on a device."""
    if device is None or device.type != "cuda":
        return BLOCK_N, NUM_WARPS, TARGET_PROGRAMS, UNROLL
    return _tile_of(torch.cuda.get_device_name(device))


def gemv_split(qtype: Q, n_rows: int, n_cols: int, R: int, M: int = 1, block_n: int | None = None,
               target: int | None = None, device: torch.device | None = None) -> int:
    """How many parts gemv_parts splits K into by default on device (1 for the grouped kernel's types)."""
    if not has_kernel(qtype, n_cols):
        return 1
    block_n = block_n or tile(device)[0]
    target = target or tile(device)[2]
    return max(1, min(n_cols // QK_K, target // max(1, triton.cdiv(n_rows, block_n) * R * M)))


def gemv_parts(x: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor, qtype: Q, n_rows: int, n_cols: int,
               part_offsets: tuple[int, ...] = (0,), x_div: int = 1, block_n: int | None = None,
               num_warps: int | None = None, split: int | None = None, stages: int = STAGES, unroll: int | None = None,
               out: torch.Tensor | None = None,
               xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               total: torch.Tensor | None = None) -> torch.Tensor:
    """parts (M, S, R, n_rows): row r's products x[r // x_div] @ W.T with W (n_rows, n_cols) at base + offsets[r] +
    part_offsets[m], split over S parts of K (sum over S for the product). No host sync: offsets stay on the device.
    unroll: Q4_K / Q5_K super-blocks loaded before their math (1 or 2).
    out: where to write them (a view with S from gemv_split, so that two launches can fill one buffer).
    xq: x already as q8_1 (quantize_q8_1(x), or a kernel that produced x wrote it): one launch fewer.
    total: (M, R, n_rows), where the same launch also writes the sum over S (contiguous)."""
    qtype = Q(qtype)
    x = x.float().contiguous()
    R, M = offsets.shape[0], len(part_offsets)
    assert M in (1, 2) and x.shape[0] * x_div == R
    if not has_kernel(qtype, n_cols):  # one "expert" per row for the grouped kernel
        xr = x.repeat_interleave(x_div, dim=0) if x_div > 1 else x
        seg = torch.arange(R + 1, dtype=torch.int32, device=x.device)
        skip = offsets == SKIP
        parts = torch.stack([torch.where(skip[:, None], 0.0, moe_matmul(
            xr, base, torch.where(skip, SKIP, offsets + p), seg, 1, qtype, n_rows, n_cols)) for p in part_offsets])[:, None]
        if total is not None:
            total.view(M, R, n_rows).copy_(parts[:, 0])
        return parts if out is None else out.copy_(parts)
    default = tile(x.device)
    block_n, num_warps = block_n or default[0], num_warps or default[1]
    tiles = triton.cdiv(n_rows, block_n)
    if out is not None:
        split = out.shape[1]
    elif split is None:
        split = gemv_split(qtype, n_rows, n_cols, R, M, block_n, device=x.device)
    if out is None:
        out = torch.empty((M, split, R, n_rows), dtype=torch.float32, device=x.device)
    reduce = total is not None and split > 1
    if total is not None and split == 1:
        out = total.view(M, 1, R, n_rows)  # one part: it is the sum
    if R and n_rows:
        p0, p1 = part_offsets[0], part_offsets[-1]
        xq, xd, xs = quantize_q8_1(x) if xq is None else xq
        kernel, consts = KERNELS[qtype]
        if kernel is _q4_k_gemv:  # the kernel that unrolls
            consts = {**consts, "UNROLL": unroll or default[3]}
        kernel[(tiles, R, split * M)](xq, xd, xs, base, offsets, p0, p1, out, total if reduce else out,
                                      counters(x.device, tiles * R * M) if reduce else offsets, n_rows,
                                      out.stride(2), out.stride(1), out.stride(0), K=n_cols, SPLIT=split, X_DIV=x_div,
                                      BLOCK_N=block_n, STAGES=stages, ASM=x.is_cuda, REDUCE=reduce,
                                      num_warps=num_warps, **consts)
    return out


def gemv(x: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor, qtype: Q, n_rows: int, n_cols: int,
         part_offset: int = 0, x_div: int = 1, xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
         **tile) -> torch.Tensor:
    """out[r] = x[r // x_div] @ W_r.T, W_r (n_rows, n_cols) at base + offsets[r] + part_offset; (R, n_rows) float32,
    summed over split parts by the launch itself."""
    total = torch.empty((offsets.shape[0], n_rows), dtype=torch.float32, device=x.device)
    gemv_parts(x, base, offsets, qtype, n_rows, n_cols, (part_offset,), x_div, xq=xq, total=total, **tile)
    return total
