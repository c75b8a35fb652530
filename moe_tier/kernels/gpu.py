"""Triton matmuls straight from GGUF blocks: one launch serves every selected expert of a layer.

Shape key: M token rows (grouped by expert), K = n_cols (reduced), N = n_rows (output features),
E experts in use, QK values per block, BB bytes per block (gguf.GGML_QUANT_SIZES).
  x      (M, K)  float32 or bfloat16   token rows sorted so each expert's rows are contiguous
  arena  (B,)    uint8                 raw GGUF blocks: expert e's matrix starts at byte w_offsets[e]
  seg    (E+1,)  int32                 expert e owns rows seg[e] .. seg[e+1]
  out    (M, N)  float32

Blocks are decoded in registers inside the product, never into a dequantized copy in memory: per group of G
values sharing one scale (32, or 16 for Q2_K/Q3_K/Q6_K), the integer quants q (G, BLOCK_N) go through tl.dot
and each row's scale a and offset b are applied after it: acc += (x_g @ q) * a + sum(x_g) * b, as llama.cpp's
kernels do. Layouts follow gguf.quants' dequantizers. Weights are read byte-wise, so blobs need no alignment
(Q4_K / Q5_K quants may be read as 32-bit words where the caller vouches that matrices start 16-byte aligned).
The product runs at Triton's default float32 dot precision (tf32 on tensor cores): about 1e-3 relative error.
Runs under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from moe_tier.errors import MoeTierError

SUPPORTED: frozenset[Q] = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
# tl.dot needs every tile side >= 16. Static counts for sm_90 (cuobjdump of the loop over 64 K values), Q4_K,
# in warp instructions per weight value: 1.19 at BLOCK_N 32 / 4 warps (150 registers), 0.97 at 64 / 4 (242),
# 0.56 at 128 / 4 (224); dequantizing every value with its scales instead cost 2.66. Timed on an H100
# (bench/gpu_tiers.py, Mixtral-shaped Q4_K, T=1, 2 experts): about 180 GB/s at 32 / 4, 12% of the copy read rate
# and 2.4x slower than the instruction count predicts, so latency, not issue, bounds it: the next step is more
# bytes in flight (wide loads of the quant bytes, pipelining, split-K for short N). 32 / 4 is the best all-round.
# Aligned Q4_K / Q5_K quants can load as 32-bit words (aligned=): on an H200 (bench/gpu_tiers.py) that is slower
# at this tile (117-120 against 176-195 GB/s byte-wise at T = 1..64) and faster only at block_n 128 for gate
# (199-241), slower there for down; so callers read byte-wise and the words stay a knob of the tile sweep.
BLOCK_T, BLOCK_N, BLOCK_K, NUM_WARPS = 16, 32, 64, 4
DEQUANT_MIN_ROWS = 32  # from this many token rows a matrix is decoded to float16 and multiplied by cuBLAS
DEQUANT_CHUNK_VALUES = 1 << 24  # float16 values decoded at a time: 32 MiB (plan.DEQUANT_SCRATCH_BYTES holds it)
DEQUANT_BLOCK_N = 64
GROUP_VALUES = {Q.Q2_K: 16, Q.Q3_K: 16, Q.Q6_K: 16}  # values sharing one scale; 32 for the rest
SKIP = -(2**62)  # a matrix offset that means "skip this row" (real ones, relative to host memory, may be negative)
SKIP_C = tl.constexpr(SKIP)  # the same for kernel code, which may read only constexpr globals


_COUNTERS: dict[tuple, list[torch.Tensor]] = {}  # every buffer handed out, the last current: a captured graph
# replays with the one it captured


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counters for launches whose last program to finish a piece of work completes it
    (the matrix-vector sums, the router): each launch leaves them 0 again, so launches queued one after another
    on a stream share them; each stream has its own."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    buffers = _COUNTERS.setdefault((device, stream), [])
    if not buffers or buffers[-1].numel() < n:
        buffers.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    bits = (_u8(p, mask) | (_u8(p + 1, mask) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min_k4(sb, s, mask):
    """get_scale_min_k4: sub-block s's 6-bit scale and minimum from the 12 bytes at sb (Q4_K, Q5_K)."""
    lo = s < 4
    b_s = _u8(sb + s, mask)
    b_s4 = _u8(sb + s + 4, mask)
    b_sm4 = _u8(sb + tl.where(lo, s, s - 4), mask)
    sc = tl.where(lo, b_s & 63, (b_s4 & 15) | ((b_sm4 >> 6) << 4))
    mn = tl.where(lo, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _group(bp, sb, j, m, nm, QTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Sub-block sb (G values sharing one scale) of each row's block at bp: (q (G, BLOCK_N), a, b (BLOCK_N,))
    with weight = a * q + b. q holds the small integer quants (exact in tf32), so the scales are applied once per
    row after the dot, as llama.cpp's kernels do, instead of once per value. Float types: q = value, a = 1, b = 0.
    bp points at each row's block; sb (scalar) counts G-value groups inside it; j = 0..G-1 down the rows.
    ALIGNED: the matrix starts 16-byte aligned, so Q4_K / Q5_K quants can be read as words.
    """
    R = bp[None, :]
    zero = tl.zeros_like(_f16(bp, nm))
    if QTYPE == 0:  # F32
        p = R + j * 4
        q = (_u8(p, m) | (_u8(p + 1, m) << 8) | (_u8(p + 2, m) << 16) | (_u8(p + 3, m) << 24)).to(tl.float32, bitcast=True)
        a, b = zero + 1.0, zero
    elif QTYPE == 1:  # F16
        q, a, b = _f16(R + j * 2, m), zero + 1.0, zero
    elif QTYPE == 30:  # BF16: the high half of a float32
        q = ((_u8(R + j * 2, m) | (_u8(R + j * 2 + 1, m) << 8)) << 16).to(tl.float32, bitcast=True)
        a, b = zero + 1.0, zero
    elif QTYPE == 8:  # Q8_0: d | qs[32] int8
        q = tl.load(R + 2 + j, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        a, b = _f16(bp, nm), zero
    elif QTYPE == 2 or QTYPE == 3:  # Q4_0: d | qs[16] (q - 8);  Q4_1: d | m | qs[16] (d q + m)
        byte = _u8(R + (2 if QTYPE == 2 else 4) + j % 16, m)
        q = tl.where(j < 16, byte & 15, byte >> 4).to(tl.float32)
        a = _f16(bp, nm)
        b = -8.0 * a if QTYPE == 2 else _f16(bp + 2, nm)
    elif QTYPE == 6 or QTYPE == 7:  # Q5_0: d | qh u32 | qs[16] (q - 16);  Q5_1: d | m | qh u32 | qs[16]
        qh = R + (2 if QTYPE == 6 else 4)
        byte = _u8(qh + 4 + j % 16, m)
        high = (_u8(qh + j // 8, m) >> (j % 8)) & 1
        q = (tl.where(j < 16, byte & 15, byte >> 4) | (high << 4)).to(tl.float32)
        a = _f16(bp, nm)
        b = -16.0 * a if QTYPE == 6 else _f16(bp + 2, nm)
    elif QTYPE == 10:  # Q2_K: scales[16] | qs[64] | d | dmin; group sb = 128 n + 32 shift + 16 half, scale sb
        q = ((_u8(R + 16 + 32 * (sb // 8) + 16 * (sb % 2) + j, m) >> (2 * ((sb % 8) // 2))) & 3).to(tl.float32)
        sc = _u8(bp + sb, nm)
        a = _f16(bp + 80, nm) * (sc & 15).to(tl.float32)
        b = -_f16(bp + 82, nm) * (sc >> 4).to(tl.float32)
    elif QTYPE == 11:  # Q3_K: hmask[32] | qs[64] | scales[12] | d; q - 4 where the hmask bit is clear
        n, shift, half = sb // 8, (sb % 8) // 2, sb % 2
        q = (_u8(R + 32 + 32 * n + 16 * half + j, m) >> (2 * shift)) & 3
        h = (_u8(R + 16 * half + j, m) >> (4 * n + shift)) & 1
        q = (q - 4 + 4 * h).to(tl.float32)
        low = (_u8(bp + 96 + sb % 8, nm) >> (4 * (sb // 8))) & 15
        high = (_u8(bp + 104 + sb % 4, nm) >> (2 * (sb // 4))) & 3
        a, b = _f16(bp + 108, nm) * ((low | (high << 4)) - 32).to(tl.float32), zero
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K: d | dmin | scales[12] | qs[128];  Q5_K: ... | qh[32] | qs[128]
        qs = R + (16 if QTYPE == 12 else 48) + 32 * (sb // 2)  # sub-blocks 2c, 2c + 1 share 32 bytes
        if ALIGNED:  # as eight 32-bit words a row (wide loads), spread back into bytes in registers
            w = tl.load(qs.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, 8)[:, None], mask=nm[None, :],
                        other=0)  # (8, BLOCK_N)
            byte = tl.reshape(w[:, None, :] >> (8 * tl.arange(0, 4))[None, :, None], (32, R.shape[1])) & 255
        else:
            byte = _u8(qs + j, m)
        q = (byte >> (4 * (sb % 2))) & 15
        if QTYPE == 13:
            q = q | (((_u8(R + 16 + j, m) >> sb) & 1) << 4)
        q = q.to(tl.float32)
        sc, mn = _scale_min_k4(bp + 4, sb, nm)
        a, b = _f16(bp, nm) * sc, -_f16(bp + 2, nm) * mn
    else:  # 14, Q6_K: ql[128] | qh[64] | scales[16] int8 | d; group sb = 128 n + 32 g + 16 half, q - 32
        n, g, half = sb // 8, (sb % 8) // 2, sb % 2
        l = 16 * half + j
        low = (_u8(R + 64 * n + l + 32 * (g % 2), m) >> (4 * (g // 2))) & 15
        high = (_u8(R + 128 + 32 * n + l, m) >> (2 * g)) & 3
        q = (low | (high << 4)).to(tl.float32)
        sc = tl.load(bp + 192 + 8 * n + half + 2 * g, mask=nm, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        a = _f16(bp + 208, nm) * sc
        b = -32.0 * a
    return q, a, b


@triton.jit
def _grouped_matmul(
    x_ptr, arena_ptr, w_off_ptr, seg_ptr, out_ptr, N, stride_x, stride_out,
    K: tl.constexpr, QTYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, G: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Program (n tile, expert, row tile): out[rows, n] = x[rows] @ W_e[n].T for expert e's rows.

    Per G-value group: acc += (x_g @ q_g) * a + sum(x_g) * b, the group's scale a and offset b per row.
    """
    e = tl.program_id(1)
    end = tl.load(seg_ptr + e + 1)
    m0 = tl.load(seg_ptr + e) + tl.program_id(2) * BLOCK_T
    w_off = tl.load(w_off_ptr + e)
    if ALIGNED:
        w_off = tl.multiple_of(w_off, 16)
    if (m0 < end) & (w_off != SKIP_C):  # the expert is computed on another GPU
        rows = m0 + tl.arange(0, BLOCK_T)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < end, n < N
        row_bytes = (K // QK) * BB
        w_rows = arena_ptr + w_off + n.to(tl.int64) * row_bytes  # (BLOCK_N,)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x  # (BLOCK_T, 1)
        j = tl.arange(0, G)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            for i in tl.static_range(BLOCK_K // G):
                kg = k0 + i * G
                kmask = kg + j < K
                xt = tl.load(x_rows + (kg + j)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                bp = w_rows + (kg // QK) * BB
                q, a, b = _group(bp, (kg % QK) // G, j[:, None], kmask[:, None] & nmask[None, :], nmask & (kg < K), QTYPE,
                                 ALIGNED)
                acc += tl.dot(xt, q) * a[None, :] + tl.sum(xt, axis=1)[:, None] * b[None, :]
        out = out_ptr + rows[:, None].to(tl.int64) * stride_out + n[None, :]
        tl.store(out, acc, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _dequantize(arena_ptr, w_off, out_ptr, row0, N, K: tl.constexpr, QTYPE: tl.constexpr, QK: tl.constexpr,
                BB: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ALIGNED: tl.constexpr):
    """Program (n tile, k tile): out[n - row0, k] = W[n, k] as float16, W's rows row0 .. N, decoded by _group."""
    n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = arena_ptr + w_off + n.to(tl.int64) * ((K // QK) * BB)
    j = tl.arange(0, G)
    for i in tl.static_range(BLOCK_K // G):
        kg = tl.program_id(1) * BLOCK_K + i * G
        kmask = kg + j < K
        q, a, b = _group(w_rows + (kg // QK) * BB, (kg % QK) // G, j[:, None], kmask[:, None] & nmask[None, :],
                         nmask & (kg < K), QTYPE, ALIGNED)
        v = tl.trans(q * a[None, :] + b[None, :])  # (BLOCK_N, G): consecutive k along a row, as stored
        at = (n - row0)[:, None].to(tl.int64) * K + (kg + j)[None, :]
        tl.store(out_ptr + at, v.to(tl.float16), mask=nmask[:, None] & kmask[None, :])


def dequantize(arena: torch.Tensor, offset: int, qtype: Q, n_rows: int, n_cols: int, row0: int = 0,
               rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows row0 .. row0 + rows of the matrix at arena[offset:] decoded to float16 (rows, n_cols), on the device
    (out: where to write them)."""
    qtype = Q(qtype)
    qk, bb = block_shape(qtype)
    rows = n_rows - row0 if rows is None else rows
    out = torch.empty((rows, n_cols), dtype=torch.float16, device=arena.device) if out is None else out
    block_k = max(qk, 64)
    if rows and n_cols:
        _dequantize[(triton.cdiv(rows, DEQUANT_BLOCK_N), triton.cdiv(n_cols, block_k))](
            arena, offset, out, row0, row0 + rows, K=n_cols, QTYPE=int(qtype), QK=qk, BB=bb,
            G=GROUP_VALUES.get(qtype, 32), BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k,
            ALIGNED=(arena.data_ptr() + offset) % 16 == 0, num_warps=4)
    return out


def matmul_dequantized(x: torch.Tensor, arena: torch.Tensor, offset: int, qtype: Q, n_rows: int,
                       n_cols: int) -> torch.Tensor:
    """x (T, K) @ W.T for W at arena[offset:], (T, N) float32: at prefill sizes the product is bound by compute,
    not by reading the weights once, so W is decoded to float16 a chunk of rows at a time (DEQUANT_CHUNK_VALUES
    of scratch) and multiplied by cuBLAS on tensor cores, as llama.cpp's CUDA backend does for large batches."""
    x16 = x.to(torch.float16)
    out = torch.empty((x.shape[0], n_rows), dtype=torch.float32, device=x.device)
    chunk = max(DEQUANT_BLOCK_N, DEQUANT_CHUNK_VALUES // max(n_cols, 1) // DEQUANT_BLOCK_N * DEQUANT_BLOCK_N)
    buf = torch.empty((min(chunk, n_rows), n_cols), dtype=torch.float16, device=x.device)
    for r0 in range(0, n_rows, chunk):
        r = min(chunk, n_rows - r0)
        w = dequantize(arena, offset, qtype, n_rows, n_cols, r0, r, out=buf[:r])
        out[:, r0 : r0 + r] = x16 @ w.T
    return out


def block_shape(qtype: Q) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[Q(qtype)]


def matrix_bytes(qtype: Q, n_rows: int, n_cols: int) -> int:
    qk, bb = block_shape(qtype)
    return n_rows * (n_cols // qk) * bb


def moe_matmul(
    x: torch.Tensor, arena: torch.Tensor, w_offsets: torch.Tensor, seg: torch.Tensor, max_rows: int,
    qtype: Q, n_rows: int, n_cols: int, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS, block_t: int = BLOCK_T,
    aligned: bool = False,
) -> torch.Tensor:
    """Grouped x @ W_e.T: rows seg[e]:seg[e+1] of x (M, K) use the matrix at arena[w_offsets[e]:]; (M, N) float32.
    Rows of an expert whose offset is SKIP are left unwritten. aligned: the caller knows every offset is a
    multiple of 16 (slots and blobs are), so quants may be read as words; else they are read byte-wise.

    max_rows (most rows of any one expert) sizes the grid; the host knows it from the routing.
    """
    qtype = Q(qtype)
    if qtype not in SUPPORTED:
        raise MoeTierError(None, f"no GPU kernel for quant type {qtype.name}")
    qk, bb = block_shape(qtype)
    if n_cols % qk:
        raise MoeTierError(None, f"{n_cols} columns is not a multiple of the {qtype.name} block ({qk})")
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise MoeTierError(None, f"activations of shape {tuple(x.shape)} do not match a weight of {n_cols} columns")
    if arena.dtype != torch.uint8 or w_offsets.dtype != torch.int64 or seg.dtype != torch.int32:
        raise MoeTierError(None, "arena must be uint8, w_offsets int64 and seg int32")
    x = x.contiguous()
    out = torch.empty((x.shape[0], n_rows), dtype=torch.float32, device=x.device)
    n_experts = w_offsets.numel()
    if x.shape[0] and n_rows and n_experts and max_rows:
        grid = (triton.cdiv(n_rows, block_n), n_experts, triton.cdiv(max_rows, block_t))
        _grouped_matmul[grid](
            x, arena, w_offsets, seg, out, n_rows, x.stride(0), out.stride(0),
            K=n_cols, QTYPE=int(qtype), QK=qk, BB=bb, G=GROUP_VALUES.get(qtype, 32),
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=BLOCK_K, ALIGNED=aligned and arena.data_ptr() % 16 == 0,
            num_warps=num_warps,
        )
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, qtype: Q, n_rows: int, n_cols: int) -> torch.Tensor:
    """x (T, K) @ W.T for W (N, K) held as raw GGUF blocks in the uint8 tensor w; (T, N) float32. From
    DEQUANT_MIN_ROWS tokens W is decoded to float16 in chunks for cuBLAS."""
    qtype = Q(qtype)
    expected = matrix_bytes(qtype, n_rows, n_cols) if qtype in SUPPORTED else None
    w = w.reshape(-1)
    if expected is not None and w.numel() != expected:
        raise MoeTierError(None, f"{qtype.name} weight of {n_rows}x{n_cols} needs {expected} bytes, got {w.numel()}")
    if x.shape[0] >= DEQUANT_MIN_ROWS and qtype in SUPPORTED:
        return matmul_dequantized(x, w, 0, qtype, n_rows, n_cols)
    offsets = torch.zeros(1, dtype=torch.int64, device=w.device)
    seg = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=w.device)
    return moe_matmul(x, w, offsets, seg, x.shape[0], qtype, n_rows, n_cols)
