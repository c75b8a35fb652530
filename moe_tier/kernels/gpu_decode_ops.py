"""Fused Triton kernels for the dense part of a single-token decode step: norms, rope, cache writes, attention.

Shape key: N rows (tokens, or tokens x heads for per-head norms), D normalised width; H query heads, Hkv
key/value heads, G = H // Hkv query heads per kv head, d key head dim, dv value head dim, n_rot rotated dims,
L = n_keys cache rows attended, S split parts of the keys.
  x, r        (N, D) or (N, H, D) float32 (per-head norms), the last dim normalised; weight (D,)
  q           (1, H, d) float32;  k (1, Hkv, d), v (1, Hkv, dv) float32, the new token's
  cos, sin    (1, n_rot / 2) float32, the token's rope angles
  k_cache     (ctx, Hkv, d), v_cache (ctx, Hkv, dv) float16: one layer's views, row pos written here
  pos         (1,) int64 on the device: the token's position (rows past it are masked)
  out         (1, H * dv) float32

At batch 1 the torch version of these steps is dozens of launches of a few microseconds each; here a norm is
one launch (at decode also writing its q8_1 form) and attention is two (the second's last program of each kv head
sums the split parts). Attention rounds where llama.cpp (and GpuOps._causal) round: q and the cache to f16, scores and softmax in float32, probabilities to f16
after normalising. Normalising before rounding needs the global max and sum first, hence two passes over the
keys: the first launch finds each split part's max and sum (and writes the new row), the second combines them
and accumulates f16 probabilities times values. Splitting the keys over S programs per kv head keeps long
contexts from running on a handful of SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_tier.kernels.gpu import counters
from moe_tier.kernels.gpu_q8_1 import q8_1_blocks, q8_1_empty

BLOCK_L = 64  # cache rows per step of the key loops
MIN_SPLIT_KEYS = 256  # keys per split part at least: fewer would spend more on the combine than they save
TARGET_PROGRAMS = 256  # kv heads x split parts: about two per SM of an H100
NEG = tl.constexpr(-1e30)  # masked score: finite, so a part with no keys gives exp(NEG - max) = 0, not NaN


@triton.jit
def _rms_norm(x_ptr, r_ptr, s_ptr, w_ptr, out_ptr, q_ptr, d_ptr, qs_ptr, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
              ADD: tl.constexpr, QUANT: tl.constexpr):
    """Program per row: (s = x + r, written when ADD), out = s * rsqrt(mean(s^2) + eps) * w, and with QUANT out
    as q8_1 too (quants, scales, scaled sums: gpu_q8_1), which the matrix-vector kernels after the norm read."""
    row = tl.program_id(0).to(tl.int64)
    at = row * D + tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_D) < D
    x = tl.load(x_ptr + at, mask=m, other=0.0)
    if ADD:
        x = x + tl.load(r_ptr + at, mask=m, other=0.0)
        tl.store(s_ptr + at, x, mask=m)
    ms = tl.sum(x * x, axis=0) / D
    w = tl.load(w_ptr + tl.arange(0, BLOCK_D), mask=m, other=0.0)
    y = x * tl.rsqrt(ms + eps) * w
    tl.store(out_ptr + at, y, mask=m)
    if QUANT:
        blk = tl.arange(0, BLOCK_D // 32)
        i = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
        q, d, qs = q8_1_blocks(tl.reshape(y, (BLOCK_D // 32, 32)))
        tl.store(q_ptr + row * D + i, q.to(tl.int8), mask=i < D)
        tl.store(d_ptr + row * (D // 32) + blk, d, mask=blk < D // 32)
        tl.store(qs_ptr + row * (D // 32) + blk, qs, mask=blk < D // 32)


def _norm(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, eps: float, quant: bool = False):
    x = x.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    s = out if r is None else torch.empty_like(x)
    block = triton.next_power_of_2(D)
    quant = quant and x.dim() == 2 and D % 32 == 0
    xq = q8_1_empty(len(x), D, x.device) if quant else (x, x, x)
    if x.numel():
        _rms_norm[(x.numel() // D,)](x, x if r is None else r.contiguous(), s, weight.contiguous(), out, *xq, float(eps),
                                     D=D, BLOCK_D=block, ADD=r is not None, QUANT=quant,
                                     num_warps=min(16, max(1, block // 256)))
    if quant:
        out.q8_1 = xq  # carried with the tensor: gpu_q8_1.carried_q8_1
    return s, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, last dim) + eps) * weight, in one launch."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float,
                 quant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + r, the residual sum, in one launch. quant: the norm (N, D) also as q8_1, which
    the next matrix-vector products take instead of quantizing it themselves (one launch fewer each)."""
    return _norm(x, r, weight, eps, quant)


@triton.jit
def _rope(ptr, row, rmask, j, cos_ptr, sin_ptr, D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr):
    """x[row + j] rotated as layers.rope (dims j >= 2 * HALF pass through); row and j broadcast to the shape."""
    if NEOX:  # pairs (i, i + HALF)
        first = j < HALF
        partner = tl.where(first, j + HALF, j - HALF)
        i = tl.where(first, j, j - HALF)
    else:  # pairs (2i, 2i + 1)
        first = j % 2 == 0
        partner = tl.where(first, j + 1, j - 1)
        i = j // 2
    rot = j < 2 * HALF
    x = tl.load(ptr + row + j, mask=rmask & (j < D), other=0.0)
    xp = tl.load(ptr + row + partner, mask=rmask & rot, other=0.0)
    c = tl.load(cos_ptr + i, mask=rot, other=1.0)
    s = tl.load(sin_ptr + i, mask=rot, other=0.0)
    # a*c - b*s and a*s + b*c as separate products, as layers.rope rounds them
    return x * c + tl.where(first, -1.0, 1.0) * (xp * s)


@triton.jit
def _attend_pass(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, m_ptr, l_ptr, out_ptr, sum_ptr,
                 cnt_ptr, oq_ptr, od_ptr, os_ptr, n_keys, scale, kc_row, kc_head, vc_row, vc_head, SPLIT,
                 CHUNK: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
                 HALF: tl.constexpr, NEOX: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, G_PAD: tl.constexpr,
                 SPLIT_PAD: tl.constexpr, BLOCK_L: tl.constexpr, SECOND: tl.constexpr, QUANT: tl.constexpr):
    """Program (kv head h, split part sp) over the part's keys at or before pos, for the G query heads of h.
    First pass: write the new row (last part), store the part's running max m and sum l of exp(score - m).
    Second pass: p = exp(score - M) / L with the global M, L of the parts, rounded to f16; store sum p * v, and
    the kv head's last part to finish (a counter per kv head, left 0) sums the parts in order into sum_ptr.
    QUANT (dv a multiple of 32): whoever writes a head's sum also writes it as q8_1 (quants at oq, scales at od,
    scaled sums at os), which the output projection reads: no quantize launch between them."""
    h = tl.program_id(0)
    sp = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)  # loop bounds and row offsets all int32
    g = tl.arange(0, G_PAD)
    heads = h * G + g
    j = tl.arange(0, D_PAD)
    jv = tl.arange(0, DV_PAD)
    q = _rope(q_ptr, heads[:, None] * D, (g < G)[:, None], j[None, :], cos_ptr, sin_ptr, D, HALF, NEOX)
    q = q.to(tl.float16)  # (G_PAD, D_PAD); padded heads and dims are 0
    kc = kc_ptr + h * kc_head
    vc = vc_ptr + h * vc_head
    lo = sp * CHUNK
    hi = tl.minimum(tl.minimum(lo + CHUNK, n_keys), pos + 1)  # rows past pos are masked: their loads read nothing
    if SECOND:
        at = tl.arange(0, SPLIT_PAD)[:, None] * H + heads[None, :]
        pm = (tl.arange(0, SPLIT_PAD) < SPLIT)[:, None] & (g < G)[None, :]
        mp = tl.load(m_ptr + at, mask=pm, other=NEG)  # (SPLIT_PAD, G_PAD)
        M = tl.where(g < G, tl.max(mp, axis=0), 0.0)  # padded heads: 0, not NEG, so their exp stays finite
        L = tl.sum(tl.load(l_ptr + at, mask=pm, other=0.0) * tl.exp(mp - M[None, :]), axis=0)
        L = tl.where(g < G, L, 1.0)
        acc = tl.zeros((G_PAD, DV_PAD), dtype=tl.float32)
    else:
        # The new key as a column (D_PAD, 1), used for row pos: other parts' programs may read the row before the
        # last part writes it (last, so that the interpreter, running parts in order, tests this too).
        k_new = _rope(k_ptr, h * D, (j < D)[:, None], j[:, None], cos_ptr, sin_ptr, D, HALF, NEOX).to(tl.float16)
        tl.store(kc + pos * kc_row + j[:, None], k_new, mask=(j < D)[:, None] & (sp == SPLIT - 1))
        v_new = tl.load(v_ptr + h * DV + jv, mask=jv < DV, other=0.0)
        tl.store(vc + pos * vc_row + jv, v_new.to(tl.float16), mask=(jv < DV) & (sp == SPLIT - 1))
        m = tl.full((G_PAD,), NEG, dtype=tl.float32)
        l = tl.zeros((G_PAD,), dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_L):  # fixed bounds (not from pos): a graph replays for every pos
        rows = lo + start + tl.arange(0, BLOCK_L)
        valid = rows < hi
        kt = tl.load(kc + rows[None, :] * kc_row + j[:, None], mask=valid[None, :] & (j < D)[:, None], other=0.0)
        if not SECOND:
            kt = tl.where(rows[None, :] == pos, k_new, kt)
        s = tl.where(valid[None, :], tl.dot(q, kt) * scale, NEG)  # (G_PAD, BLOCK_L): f16 products, f32 sums
        if SECOND:
            p = tl.where(valid[None, :], tl.exp(s - M[:, None]) / L[:, None], 0.0).to(tl.float16)
            vmask = valid[:, None] & (jv < DV)[None, :]
            vb = tl.load(vc + rows[:, None] * vc_row + jv[None, :], mask=vmask, other=0.0)
            acc += tl.dot(p, vb)
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
            e = tl.where(valid[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l = l * tl.exp(m - m_new) + tl.sum(e, axis=1)
            m = m_new
    if SECOND:
        omask = (g < G)[:, None] & (jv < DV)[None, :]
        tl.store(out_ptr + (sp * H + heads[:, None]) * DV + jv[None, :], acc, mask=omask)
        if QUANT:
            if SPLIT == 1:
                _store_q8_1(acc, heads, g, jv, oq_ptr, od_ptr, os_ptr, G, DV, G_PAD, DV_PAD)
        if SPLIT > 1:  # one part: out is the sum already
            tl.debug_barrier()  # every thread's store before the counter moves
            if tl.atomic_add(cnt_ptr + h, 1) == SPLIT - 1:
                total = tl.zeros((G_PAD, DV_PAD), dtype=tl.float32)
                for p in tl.static_range(SPLIT_PAD):  # from L2: other SMs wrote them
                    total += tl.load(out_ptr + (p * H + heads[:, None]) * DV + jv[None, :], mask=omask & (p < SPLIT),
                                     other=0.0, cache_modifier=".cg")
                tl.store(sum_ptr + heads[:, None] * DV + jv[None, :], total, mask=omask)
                if QUANT:
                    _store_q8_1(total, heads, g, jv, oq_ptr, od_ptr, os_ptr, G, DV, G_PAD, DV_PAD)
                tl.atomic_xchg(cnt_ptr + h, 0)
    else:
        tl.store(m_ptr + sp * H + heads, m, mask=g < G)
        tl.store(l_ptr + sp * H + heads, l, mask=g < G)


@triton.jit
def _store_q8_1(y, heads, g, jv, q_ptr, d_ptr, s_ptr, G: tl.constexpr, DV: tl.constexpr, G_PAD: tl.constexpr,
                DV_PAD: tl.constexpr):
    """Heads' outputs y (G_PAD, DV_PAD), DV = DV_PAD a multiple of 32, as q8_1 in the output row's layout."""
    q, d, s = q8_1_blocks(tl.reshape(y, (G_PAD * DV_PAD // 32, 32)))
    tl.store(q_ptr + heads[:, None] * DV + jv[None, :], tl.reshape(q, (G_PAD, DV_PAD)).to(tl.int8),
             mask=(g < G)[:, None])
    b = tl.arange(0, DV_PAD // 32)
    at = heads[:, None] * (DV // 32) + b[None, :]
    tl.store(d_ptr + at, tl.reshape(d, (G_PAD, DV_PAD // 32)), mask=(g < G)[:, None])
    tl.store(s_ptr + at, tl.reshape(s, (G_PAD, DV_PAD // 32)), mask=(g < G)[:, None])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     rope_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_keys: int,
                     scale: float, *, split: int | None = None, block_l: int = BLOCK_L) -> torch.Tensor:
    """Rope q and k, write rope(k) and v (f16) at cache row pos, attend q over rows 0..min(pos, n_keys - 1).
    No host sync: pos stays on the device, n_keys and split are fixed per captured graph. Where dv is a multiple of
    32 the output carries its q8_1 form too (gpu_q8_1.carried_q8_1), written by the same launch."""
    _, H, d = q.shape
    Hkv, dv = v.shape[1], v.shape[2]
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and H % Hkv == 0
    # Parts of a multiple of MIN_SPLIT_KEYS rows: one chunk size (one compile) serves most n_keys buckets.
    step = block_l if split else MIN_SPLIT_KEYS
    chunk = triton.cdiv(triton.cdiv(n_keys, split or max(1, TARGET_PROGRAMS // Hkv)), step) * step
    split = triton.cdiv(n_keys, chunk)  # no part left without rows
    stats = torch.empty((2, split, H), dtype=torch.float32, device=q.device)  # max, sum per part and head
    out = torch.empty((split, H, dv), dtype=torch.float32, device=q.device)
    total = out[0] if split == 1 else torch.empty((H, dv), dtype=torch.float32, device=q.device)
    G = H // Hkv
    pads = [max(16, triton.next_power_of_2(n)) for n in (d, dv, G)]  # tl.dot takes no side under 16
    quant = dv % 32 == 0 and dv == pads[1]
    xq = q8_1_empty(1, H * dv, q.device) if quant else (total, total, total)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), cos.contiguous(), sin.contiguous(), pos, k_cache,
            v_cache, stats[0], stats[1], out, total, counters(q.device, Hkv), *xq, n_keys, float(scale),
            k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), split)  # split at run time: a new bucket compiles nothing
    for second in (False, True):
        _attend_pass[(Hkv, split)](*args, CHUNK=chunk, H=H, D=d, DV=dv, G=G, HALF=cos.shape[-1], NEOX=rope_neox,
                                   D_PAD=pads[0], DV_PAD=pads[1], G_PAD=pads[2],
                                   SPLIT_PAD=max(2, triton.next_power_of_2(split)), BLOCK_L=block_l, SECOND=second,
                                   QUANT=quant and second)
    result = total.reshape(1, H * dv)
    if quant:
        result.q8_1 = xq  # carried with the tensor: gpu_q8_1.carried_q8_1
    return result
