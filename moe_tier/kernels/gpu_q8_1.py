"""Activations as llama.cpp's q8_1 for the dp4a matrix-vector kernels (kernels/gpu_gemv.py).

Shape key: R rows, K values a row (a multiple of 32).
  quants  (R, K)      int8     round(x / d), round half away from zero
  scales  (R, K / 32) float32  d = amax / 127 of each block of 32, rounded to f16 (as llama.cpp stores it)
  sums    (R, K / 32) float32  d * sum(quants): what a weight's block minimum multiplies
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of a's and b's four signed bytes: one dp4a instruction on the GPU (ASM), shifts in the
    interpreter, which cannot run PTX."""
    if ASM:
        out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        out = c
        for i in tl.static_range(4):
            out += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def q8_1_blocks(x):
    """x (BLOCKS, 32) float32 -> int8-valued quants (int32), scale d = amax / 127 rounded to f16, and d *
    sum(quants): llama.cpp's quantize_q8_1 (round half away from zero), as vec_dot_q4_K_q8_1 uses them."""
    amax = tl.max(tl.abs(x), axis=1)
    d = amax / 127.0
    v = x / tl.where(amax == 0.0, 1.0, d)[:, None]
    q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v)).to(tl.int32)
    d16 = d.to(tl.float16).to(tl.float32)
    return q, d16, d16 * tl.sum(q, axis=1).to(tl.float32)


@triton.jit
def _quantize_q8_1(x_ptr, q_ptr, d_ptr, s_ptr, K, BLOCKS: tl.constexpr):
    """Program (row, tile): BLOCKS blocks of 32 values."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    at = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    m = at < K
    q, d, s = q8_1_blocks(tl.load(x_ptr + row * K + at, mask=m, other=0.0))
    tl.store(q_ptr + row * K + at, q.to(tl.int8), mask=m)
    tl.store(d_ptr + row * (K // 32) + blk, d, mask=blk < K // 32)
    tl.store(s_ptr + row * (K // 32) + blk, s, mask=blk < K // 32)


def q8_1_empty(R: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Room for R rows of K values as q8_1: quants (R, K) int8, scales and scaled sums (R, K / 32) float32."""
    d = torch.empty((R, K // 32), dtype=torch.float32, device=device)
    return torch.empty((R, K), dtype=torch.int8, device=device), d, torch.empty_like(d)


def quantize_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (R, K) float32 -> quants (R, K) int8, scales (R, K / 32) and scaled sums (R, K / 32) float32."""
    R, K = x.shape
    q, d, s = q8_1_empty(R, K, x.device)
    BLOCKS = 32
    if R:
        _quantize_q8_1[(R, triton.cdiv(K // 32, BLOCKS))](x, q, d, s, K, BLOCKS=BLOCKS)
    return q, d, s


def carried_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x's q8_1 form where the kernel that wrote x wrote it too (gpu_decode_ops.add_rms_norm with quant), else None."""
    return getattr(x, "q8_1", None)
