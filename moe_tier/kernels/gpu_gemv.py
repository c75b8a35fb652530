"""Decode-time matrix-vector products on GGUF blocks: each row of x has its own matrix, found by address.

Shape key: R rows (token x selected expert at decode, or the tokens of a dense matmul), K = n_cols (reduced),
N = n_rows (outputs), S split-K parts.
  x        (R, K)  float32
  base     (B,)    uint8   any tensor the kernel may address from: row r's matrix starts at base + offsets[r]
  offsets  (R,)    int64   byte offsets from base (plus part_offset, the matrix's place in an expert's blob);
                           they may point outside base's allocation, into pinned host memory (the warm tier),
                           which the GPU then reads over PCIe with no copy and no sync; SKIP skips the row (its
                           output is 0: another GPU computes it)
  out      (R, N)  float32

At batch 1 a token needs a few matrices read once each, so the kernel is built for bandwidth: Q4_K quants are
read as 32-bit words (8 nibbles) and multiplied in float32 with the activation values they pair with, one
super-block (256 values, 144 bytes) of BLOCK_N rows per step; sub-block scales and minimums are applied to the
sub-block sums, as llama.cpp does. Other types go through kernels.gpu's grouped kernel (one expert per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

from moe_tier.kernels.gpu import block_shape, moe_matmul

SKIP = -(2**62)  # an offset no matrix can have (relative offsets to host memory may be negative)
QK_K = 256
Q4_K_BYTES = 144
BLOCK_N, NUM_WARPS, STAGES = 16, 1, 1  # best of the bench/gpu_gemv.py sweep on an H100 (gate and down)
TARGET_PROGRAMS = 2048  # split-K up to this many programs: enough in flight to hide HBM (and PCIe) latency


@triton.jit
def _byte(u0, u1, u2, j):
    """Byte j (0..11, a tensor) of the 12 scale bytes held as three little-endian words."""
    word = tl.where(j < 4, u0, tl.where(j < 8, u1, u2))
    return (word >> (8 * (j % 4))) & 255


@triton.jit
def _q4_k_gemv(x_ptr, base_ptr, off_ptr, part_offset, out_ptr, N, stride_x, stride_out, stride_part,
               K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Program (n tile, row, split part): out[part, row, n] = sum over its super-blocks of x[row] . W_row[n]."""
    r = tl.program_id(1)
    part = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offset = tl.load(off_ptr + r)
    nmask = (n < N) & (offset != -4611686018427387904)  # SKIP
    row_bytes = (K // 256) * 144
    w_rows = base_ptr + (offset + part_offset) + n.to(tl.int64) * row_bytes  # (BLOCK_N,) uint8 pointers
    c = tl.arange(0, 4)  # 64-value chunk: sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
    w = tl.arange(0, 8)  # word in the chunk's 32 quant bytes
    word_at = (16 + 32 * c[:, None] + 4 * w[None, :])  # (4, 8) byte offsets of quant words in a block
    value_at = 64 * c[:, None] + 4 * w[None, :]  # (4, 8) first value of byte 0 of the word, low nibble
    x_row = x_ptr + r.to(tl.int64) * stride_x
    # Scaled products stay per lane until the end: no cross-lane reduction inside the loop.
    acc = tl.zeros((BLOCK_N, 4, 8), dtype=tl.float32)
    acc_min = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    for first in tl.range(0, K // 256, SPLIT, num_stages=STAGES):
        sb = first + part
        m = nmask & (sb < K // 256)  # the last round may have fewer super-blocks than parts
        bp = w_rows + sb * 144
        q = tl.load((bp[:, None, None] + word_at[None, :, :]).to(tl.pointer_type(tl.int32), bitcast=True),
                    mask=m[:, None, None], other=0)  # (BLOCK_N, 4, 8)
        hdr = bp.to(tl.pointer_type(tl.int32), bitcast=True)
        u = tl.load(hdr, mask=m, other=0)  # d | dmin
        u0 = tl.load(hdr + 1, mask=m, other=0)[:, None]
        u1 = tl.load(hdr + 2, mask=m, other=0)[:, None]
        u2 = tl.load(hdr + 3, mask=m, other=0)[:, None]
        d = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((u >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        xb = x_row + sb * 256 + value_at  # (4, 8)
        for h in tl.static_range(2):
            dot = tl.zeros((BLOCK_N, 4, 8), dtype=tl.float32)
            xsum = tl.zeros((4, 8), dtype=tl.float32)
            for b in tl.static_range(4):
                xv = tl.load(xb + 32 * h + b, mask=sb < K // 256, other=0.0)  # (4, 8)
                dot += ((q >> (8 * b + 4 * h)) & 15).to(tl.float32) * xv[None, :, :]
                xsum += xv
            s = 2 * c[None, :] + h  # (1, 4) sub-block index
            lo = s < 4
            b_s = _byte(u0, u1, u2, s)
            b_s4 = _byte(u0, u1, u2, s + 4)
            b_sm4 = _byte(u0, u1, u2, tl.where(lo, s, s - 4))
            sc = tl.where(lo, b_s & 63, (b_s4 & 15) | ((b_sm4 >> 6) << 4)).to(tl.float32)
            mn = tl.where(lo, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4)).to(tl.float32)
            acc += (d[:, None] * sc)[:, :, None] * dot
            acc_min += (dmin[:, None] * mn) * tl.sum(xsum, axis=1)[None, :]
    total = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(acc_min, axis=1)
    tl.store(out_ptr + part * stride_part + r.to(tl.int64) * stride_out + n, total, mask=n < N)


def gemv(x: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor, qtype: Q, n_rows: int, n_cols: int,
         part_offset: int = 0, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS, split: int | None = None,
         stages: int = STAGES) -> torch.Tensor:
    """out[r] = x[r] @ W_r.T, W_r (n_rows, n_cols) at base + offsets[r] + part_offset; (R, n_rows) float32.
    No host sync: offsets stay on the device."""
    qtype = Q(qtype)
    x = x.float().contiguous()
    R = x.shape[0]
    if qtype != Q.Q4_K:  # one "expert" per row for the grouped kernel
        seg = torch.arange(R + 1, dtype=torch.int32, device=x.device)
        skip = offsets == SKIP
        out = moe_matmul(x, base, torch.where(skip, 0, offsets) + part_offset, seg, 1, qtype, n_rows, n_cols)
        return torch.where(skip[:, None], 0.0, out)
    qk, bb = block_shape(qtype)
    assert (qk, bb) == (QK_K, Q4_K_BYTES) and n_cols % QK_K == 0
    tiles = triton.cdiv(n_rows, block_n)
    if split is None:
        split = max(1, min(n_cols // QK_K, TARGET_PROGRAMS // max(1, tiles * R)))
    out = torch.empty((split, R, n_rows), dtype=torch.float32, device=x.device)
    if R and n_rows:
        _q4_k_gemv[(tiles, R, split)](x, base, offsets, part_offset, out, n_rows, x.stride(0), out.stride(1), out.stride(0),
                                      K=n_cols, SPLIT=split, BLOCK_N=block_n, STAGES=stages, num_warps=num_warps)
    return out[0] if split == 1 else out.sum(dim=0)
