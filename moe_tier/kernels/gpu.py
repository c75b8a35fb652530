"""Triton matmuls straight from GGUF blocks: one launch serves every selected expert of a layer.

Shape key: M token rows (grouped by expert), K = n_cols (reduced), N = n_rows (output features),
E experts in use, QK values per block, BB bytes per block (gguf.GGML_QUANT_SIZES).
  x      (M, K)  float32 or bfloat16   token rows sorted so each expert's rows are contiguous
  arena  (B,)    uint8                 raw GGUF blocks: expert e's matrix starts at byte w_offsets[e]
  seg    (E+1,)  int32                 expert e owns rows seg[e] .. seg[e+1]
  out    (M, N)  float32

Blocks are dequantized in registers inside the product: a (BLOCK_K, BLOCK_N) weight tile is decoded element by
element from its bytes (one layout per type, as gguf.quants' dequantizers read them) and fed to tl.dot, so no
dequantized copy of a weight ever exists in memory. Weights are read byte-wise, so blobs need no alignment.
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
# tl.dot needs every tile side >= 16. A 64 x 32 weight tile decodes without register spills on sm_90 for every
# type (ptxas -v: ~200-230 registers, 4 warps); 128-wide K tiles or 64-wide N tiles spill.
BLOCK_T, BLOCK_N, BLOCK_K = 16, 32, 64


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
def _dequant(bp, j, mask, QTYPE: tl.constexpr):
    """Value j of the block at bp, for a tile of blocks (bp) and in-block indices (j), as float32."""
    if QTYPE == 0:  # F32
        b = _u8(bp, mask) | (_u8(bp + 1, mask) << 8) | (_u8(bp + 2, mask) << 16) | (_u8(bp + 3, mask) << 24)
        v = b.to(tl.float32, bitcast=True)
    elif QTYPE == 1:  # F16
        v = _f16(bp, mask)
    elif QTYPE == 30:  # BF16: the high half of a float32
        b = _u8(bp, mask) | (_u8(bp + 1, mask) << 8)
        v = (b << 16).to(tl.float32, bitcast=True)
    elif QTYPE == 8:  # Q8_0: d | qs[32] int8
        q = tl.load(bp + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        v = _f16(bp, mask) * q
    elif QTYPE == 2 or QTYPE == 3:  # Q4_0: d | qs[16];  Q4_1: d | m | qs[16]
        byte = _u8(bp + (2 if QTYPE == 2 else 4) + j % 16, mask)
        q = tl.where(j < 16, byte & 15, byte >> 4)
        if QTYPE == 2:
            v = _f16(bp, mask) * (q - 8).to(tl.float32)
        else:
            v = _f16(bp, mask) * q.to(tl.float32) + _f16(bp + 2, mask)
    elif QTYPE == 6 or QTYPE == 7:  # Q5_0: d | qh u32 | qs[16];  Q5_1: d | m | qh u32 | qs[16]
        qh = bp + (2 if QTYPE == 6 else 4)
        byte = _u8(qh + 4 + j % 16, mask)
        high = (_u8(qh + j // 8, mask) >> (j % 8)) & 1
        q = tl.where(j < 16, byte & 15, byte >> 4) | (high << 4)
        if QTYPE == 6:
            v = _f16(bp, mask) * (q - 16).to(tl.float32)
        else:
            v = _f16(bp, mask) * q.to(tl.float32) + _f16(bp + 2, mask)
    elif QTYPE == 10:  # Q2_K: scales[16] | qs[64] | d | dmin; j = 128 n + 32 shift + 16 half + l
        n, shift, hl = j // 128, (j % 128) // 32, j % 32
        sc = _u8(bp + 8 * n + 2 * shift + hl // 16, mask)
        q = (_u8(bp + 16 + 32 * n + hl, mask) >> (2 * shift)) & 3
        v = _f16(bp + 80, mask) * (sc & 15).to(tl.float32) * q.to(tl.float32)
        v = v - _f16(bp + 82, mask) * (sc >> 4).to(tl.float32)
    elif QTYPE == 11:  # Q3_K: hmask[32] | qs[64] | scales[12] | d; 6-bit scales - 32
        n, shift, hl = j // 128, (j % 128) // 32, j % 32
        s = 8 * n + 2 * shift + hl // 16
        low = (_u8(bp + 96 + s % 8, mask) >> (4 * (s // 8))) & 15
        high = (_u8(bp + 104 + s % 4, mask) >> (2 * (s // 4))) & 3
        q = (_u8(bp + 32 + 32 * n + hl, mask) >> (2 * shift)) & 3
        h = (_u8(bp + hl, mask) >> (4 * n + shift)) & 1
        v = _f16(bp + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32) * (q - 4 + 4 * h).to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K: d | dmin | scales[12] | qs[128];  Q5_K: ... | qh[32] | qs[128]
        c, hi, l = j // 64, (j % 64) // 32, j % 32
        sc, mn = _scale_min_k4(bp + 4, 2 * c + hi, mask)
        byte = _u8(bp + (16 if QTYPE == 12 else 48) + 32 * c + l, mask)
        q = tl.where(hi == 0, byte & 15, byte >> 4)
        if QTYPE == 13:
            q = q | (((_u8(bp + 16 + l, mask) >> (2 * c + hi)) & 1) << 4)
        v = _f16(bp, mask) * sc * q.to(tl.float32) - _f16(bp + 2, mask) * mn
    else:  # 14, Q6_K: ql[128] | qh[64] | scales[16] int8 | d; j = 128 n + 32 g + l
        n, g, l = j // 128, (j % 128) // 32, j % 32
        lb = _u8(bp + 64 * n + l + 32 * (g % 2), mask)
        low = tl.where(g < 2, lb & 15, lb >> 4)
        high = (_u8(bp + 128 + 32 * n + l, mask) >> (2 * g)) & 3
        sc = tl.load(bp + 192 + 8 * n + l // 16 + 2 * g, mask=mask, other=0).to(tl.int8, bitcast=True)
        v = _f16(bp + 208, mask) * sc.to(tl.float32) * ((low | (high << 4)) - 32).to(tl.float32)
    return v


@triton.jit
def _grouped_matmul(
    x_ptr, arena_ptr, w_off_ptr, seg_ptr, out_ptr, N, stride_x, stride_out,
    K: tl.constexpr, QTYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (n tile, expert, row tile): out[rows, n] = x[rows] @ W_e[n].T for expert e's rows."""
    e = tl.program_id(1)
    end = tl.load(seg_ptr + e + 1)
    m0 = tl.load(seg_ptr + e) + tl.program_id(2) * BLOCK_T
    if m0 < end:
        rows = m0 + tl.arange(0, BLOCK_T)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < end, n < N
        row_bytes = (K // QK) * BB
        w_rows = arena_ptr + tl.load(w_off_ptr + e) + n.to(tl.int64) * row_bytes  # (BLOCK_N,)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            bp = w_rows[None, :] + ((k // QK) * BB)[:, None]  # (BLOCK_K, BLOCK_N) block starts; a tile may
            # cover part of a 256-value super-block or several 32-value blocks: indexing is per element
            w = _dequant(bp, (k % QK)[:, None], kmask[:, None] & nmask[None, :], QTYPE)
            acc += tl.dot(xt, w)
        out = out_ptr + rows[:, None].to(tl.int64) * stride_out + n[None, :]
        tl.store(out, acc, mask=rmask[:, None] & nmask[None, :])


def block_shape(qtype: Q) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[Q(qtype)]


def matrix_bytes(qtype: Q, n_rows: int, n_cols: int) -> int:
    qk, bb = block_shape(qtype)
    return n_rows * (n_cols // qk) * bb


def moe_matmul(
    x: torch.Tensor, arena: torch.Tensor, w_offsets: torch.Tensor, seg: torch.Tensor, max_rows: int,
    qtype: Q, n_rows: int, n_cols: int,
) -> torch.Tensor:
    """Grouped x @ W_e.T: rows seg[e]:seg[e+1] of x (M, K) use the matrix at arena[w_offsets[e]:]; (M, N) float32.

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
        grid = (triton.cdiv(n_rows, BLOCK_N), n_experts, triton.cdiv(max_rows, BLOCK_T))
        _grouped_matmul[grid](
            x, arena, w_offsets, seg, out, n_rows, x.stride(0), out.stride(0),
            K=n_cols, QTYPE=int(qtype), QK=qk, BB=bb, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, qtype: Q, n_rows: int, n_cols: int) -> torch.Tensor:
    """x (T, K) @ W.T for W (N, K) held as raw GGUF blocks in the uint8 tensor w; (T, N) float32."""
    qtype = Q(qtype)
    expected = matrix_bytes(qtype, n_rows, n_cols) if qtype in SUPPORTED else None
    w = w.reshape(-1)
    if expected is not None and w.numel() != expected:
        raise MoeTierError(None, f"{qtype.name} weight of {n_rows}x{n_cols} needs {expected} bytes, got {w.numel()}")
    offsets = torch.zeros(1, dtype=torch.int64, device=w.device)
    seg = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=w.device)
    return moe_matmul(x, w, offsets, seg, x.shape[0], qtype, n_rows, n_cols)
