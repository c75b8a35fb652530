"""The small kernels around decode's expert matrix-vector products, one launch each instead of a dozen torch ops.

Shape key: T tokens, E experts per layer, k experts per token, R = T * k rows (row t * k + j is token t's j-th
expert), S split-K parts, D embedding width, F expert FFN width.
  route_topk  logits (T, E) -> ids (T, k) int32, weights (T, k): moe.route's semantics (stable ties: lower id);
              router_topk the same from x (T, D) and the router (E, D), its logits computed in the launch
  locate      ids (R,), location table -> offsets (3, R) int64: where each row's expert can be read now (hot),
              later (warm: after stage copies it into a staging slot) and either; with a CPU share it also
              publishes the staged rows' experts, their staging offsets and the layer's input to pinned host
              memory, then a flag: the host queues copies of the GPU's share of those experts (copy engines) and
              computes its own
  stage       copies the warm rows' blobs from pinned host memory into their staging slots in VRAM: a kernel
              reading host memory contiguously moves ~51 GB/s on an H100 host, the Q4_K gemv reading it in place
              ~28 (bench/gpu_host_reads.py); it runs on a side stream while the hot rows compute
  await_staged  the stream waits for the flag the host queues after those copies
  silu_mul    parts (2, S, R, F) of gate and up -> silu(gate) * up (R, F), and the same as q8_1 for the down
              projection's Q4_K kernel (no separate quantizing launch); optionally after given first values, or
              after the host's share of each staged row (its first values), spinning on the host's flag
  combine     parts (S, R, D) of down, weights (T, k) -> sum_j weights[t, j] * down[t * k + j] (T, D)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_tier.config import Gating
from moe_tier.kernels.gpu import SKIP_C, counters
from moe_tier.kernels.gpu_q8_1 import q8_1_blocks, q8_1_empty
from moe_tier.moe import MIN_WEIGHT_SUM, Routing

STAGE_PROGRAMS, STAGE_WORDS = 512, 1024  # copy programs per staged row, 32-bit words per program and round
AWAIT_MAX_SPINS = 1 << 26  # ~1 us a read of host memory: about a minute, past the host's own timeout


@triton.jit
def _select(z, t, e, valid, bias_ptr, ids_ptr, w_ptr, scale, min_sum, K: tl.constexpr, BLOCK_K: tl.constexpr,
            GATING: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """Token t's top-k of logits z (BLOCK_E,), padded with -inf: moe.route's gating, selection bias and weights."""
    if GATING == 1:  # softmax
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
    elif GATING == 2:  # sigmoid
        p = 1.0 / (1.0 + tl.exp(-z))
    else:
        p = z
    sel = p + tl.load(bias_ptr + e, mask=valid, other=0.0) if HAS_BIAS else p
    sel = tl.where(valid, sel, -float("inf"))
    kk = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in tl.static_range(K):  # k rounds of argmax, best first (argmax breaks ties to the lower index)
        best = tl.argmax(sel, axis=0)
        tl.store(ids_ptr + t * K + j, best.to(tl.int32))
        w = tl.where(kk == j, tl.sum(tl.where(e == best, p, 0.0), axis=0), w)
        sel = tl.where(e == best, -float("inf"), sel)
    chosen = kk < K
    if GATING == 3:  # softmax over the chosen k
        w = tl.where(chosen, tl.exp(w - tl.max(tl.where(chosen, w, -float("inf")), axis=0)), 0.0)
        w = w / tl.sum(w, axis=0)
    if NORM:
        w = w / tl.maximum(tl.sum(tl.where(chosen, w, 0.0), axis=0), min_sum)
    tl.store(w_ptr + t * K + kk, w * scale, mask=chosen)


@triton.jit
def _route(logits_ptr, bias_ptr, ids_ptr, w_ptr, E, scale, min_sum, K: tl.constexpr, BLOCK_E: tl.constexpr,
           BLOCK_K: tl.constexpr, GATING: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    z = tl.load(logits_ptr + t * E + e, mask=e < E, other=-float("inf"))
    _select(z, t, e, e < E, bias_ptr, ids_ptr, w_ptr, scale, min_sum, K, BLOCK_K, GATING, HAS_BIAS, NORM)


@triton.jit
def _router_route(x_ptr, router_ptr, rbias_ptr, parts_ptr, cnt_ptr, bias_ptr, ids_ptr, w_ptr, E, D, scale, min_sum,
                  CHUNK: tl.constexpr, PARTS: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                  GATING: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, NORM: tl.constexpr):
    """Program (token t, part): the router's columns [part * CHUNK, + CHUNK) times x[t], partial logits to parts;
    the token's last part to finish (a counter per token, left 0) sums the parts in order, adds the router's bias
    and selects."""
    t = tl.program_id(0)
    part = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, CHUNK, BLOCK_D):
        d = part * CHUNK + d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + t * D + d, mask=d < D, other=0.0)
        w = tl.load(router_ptr + e[:, None].to(tl.int64) * D + d[None, :], mask=valid[:, None] & (d < D)[None, :],
                    other=0.0)
        acc += w * x[None, :]
    T = tl.num_programs(0)
    tl.store(parts_ptr + (part * T + t) * E + e, tl.sum(acc, axis=1), mask=valid)
    tl.debug_barrier()  # every thread's store before the counter moves
    if tl.atomic_add(cnt_ptr + t, 1) == PARTS - 1:
        z = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for p in range(PARTS):  # from L2: other SMs wrote them
            z += tl.load(parts_ptr + (p * T + t) * E + e, mask=valid, other=0.0, cache_modifier=".cg")
        if HAS_RBIAS:
            z += tl.load(rbias_ptr + e, mask=valid, other=0.0)
        _select(tl.where(valid, z, -float("inf")), t, e, valid, bias_ptr, ids_ptr, w_ptr, scale, min_sum, K, BLOCK_K,
                GATING, HAS_BIAS, NORM)
        tl.atomic_xchg(cnt_ptr + t, 0)


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, gating: Gating, weights_norm: bool,
               weights_scale: float) -> Routing:
    T, E = logits.shape
    ids, weights, scale, consts = _routing_out(T, E, k, gating, weights_norm, weights_scale, bias, logits.device)
    _route[(T,)](logits.float().contiguous(), logits if bias is None else bias.float().contiguous(), ids, weights, E,
                 scale, MIN_WEIGHT_SUM, **consts)
    return Routing(ids, weights)


ROUTER_PART_BYTES = 16 << 10  # router bytes a program reads: Mixtral's 128 KiB router over 8 programs
ROUTER_MAX_PARTS = 64


def router_topk(x: torch.Tensor, router: torch.Tensor, router_bias: torch.Tensor | None, bias: torch.Tensor | None,
                k: int, gating: Gating, weights_norm: bool, weights_scale: float) -> Routing:
    """route_topk of the logits x @ router.T (+ router_bias), computed in the same launch: x (T, D), router (E, D)
    float32. At decode the router's product alone was two cuBLAS launches, each with its gap in the graph."""
    T, D = x.shape
    E = router.shape[0]
    ids, weights, scale, consts = _routing_out(T, E, k, gating, weights_norm, weights_scale, bias, x.device)
    block_d = max(16, min(512, 4096 // consts["BLOCK_E"]))  # a (BLOCK_E, BLOCK_D) tile of 4096 values a step
    parts = min(ROUTER_MAX_PARTS, triton.cdiv(D, block_d), max(1, E * D * 4 // ROUTER_PART_BYTES))
    chunk = triton.cdiv(triton.cdiv(D, parts), block_d) * block_d
    parts = triton.cdiv(D, chunk)
    partial = torch.empty((parts, T, E), dtype=torch.float32, device=x.device)
    if T:
        _router_route[(T, parts)](x.float().contiguous(), router, router if router_bias is None else router_bias, partial,
                                  counters(x.device, T), router if bias is None else bias.float().contiguous(), ids,
                                  weights, E, D, scale, MIN_WEIGHT_SUM, CHUNK=chunk, PARTS=parts, BLOCK_D=block_d,
                                  HAS_RBIAS=router_bias is not None, num_warps=4, **consts)
    return Routing(ids, weights)


def _routing_out(T: int, E: int, k: int, gating: Gating, weights_norm: bool, weights_scale: float,
                 bias: torch.Tensor | None, device: torch.device):
    """ids and weights to fill, the weights' scale, and the selection's constants."""
    ids = torch.empty((T, k), dtype=torch.int32, device=device)
    weights = torch.empty((T, k), dtype=torch.float32, device=device)
    scale = 1.0 if weights_scale in (0.0, 1.0) else weights_scale
    consts = dict(K=k, BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k), GATING=gating.value,
                  HAS_BIAS=bias is not None, NORM=weights_norm)
    return ids, weights, scale, consts


@triton.jit
def _locate(ids_ptr, loc_ptr, first, arena_bytes, stage_at, slot_bytes, pf_ids_ptr, pf_at_ptr, out_ptr, R,
            x_ptr, base_ptr, at_flag, at_ids, at_late, at_x, seq_ptr, N_STAGE: tl.constexpr, N_PF: tl.constexpr,
            BLOCK: tl.constexpr, PUBLISH: tl.constexpr, N_X: tl.constexpr, BLOCK_X: tl.constexpr,
            ASM: tl.constexpr):
    r = tl.arange(0, BLOCK)
    m = r < R
    e = tl.load(ids_ptr + r, mask=m, other=0)
    offset = tl.load(loc_ptr + first + e, mask=m, other=0)
    warm = (offset != SKIP_C) & ((offset < 0) | (offset >= arena_bytes))  # not skipped, not in a slot
    fetched = tl.full((BLOCK,), SKIP_C, tl.int64)
    for j in tl.static_range(N_PF):  # staged ahead by a lookahead (prefetch): read from there
        at = tl.load(pf_at_ptr + j)
        fetched = tl.where((tl.load(pf_ids_ptr + j) == e) & (at != SKIP_C), at, fetched)
    now = tl.where(warm & (fetched != SKIP_C), fetched, offset)
    stage = warm & (fetched == SKIP_C) & (r < N_STAGE)
    dst = stage_at + r.to(tl.int64) * slot_bytes
    late = tl.where(stage, dst, SKIP_C)
    tl.store(out_ptr + r, tl.where(stage, SKIP_C, now), mask=m)  # now
    tl.store(out_ptr + R + r, late, mask=m)
    tl.store(out_ptr + 2 * R + r, tl.where(stage, dst, now), mask=m)  # every
    if PUBLISH:  # each row's expert where it is staged (else -1), its staging offset and the layer's input to
        # pinned host memory, then this step's number to the flag the host polls
        tl.store((base_ptr + at_ids).to(tl.pointer_type(tl.int32), bitcast=True) + r, tl.where(stage, e, -1), mask=m)
        tl.store((base_ptr + at_late).to(tl.pointer_type(tl.int64), bitcast=True) + r, late, mask=m)
        x_host = (base_ptr + at_x).to(tl.pointer_type(tl.float32), bitcast=True)
        for i in tl.static_range(0, N_X, BLOCK_X):
            j = i + tl.arange(0, BLOCK_X)
            tl.store(x_host + j, tl.load(x_ptr + j, mask=j < N_X), mask=j < N_X)
        tl.debug_barrier()
        seq = _fence(tl.load(seq_ptr), ASM)
        tl.store((base_ptr + at_flag).to(tl.pointer_type(tl.int32), bitcast=True), seq)


@dataclass(frozen=True)
class Publish:
    """Where locate also hands the staged rows to the host (cpu_share.CpuShare): the layer's input x (T, D) float32
    and contiguous, and pinned buffers at base + at_* (base: the GPU's slot arena) for the rows' experts, their
    staging offsets and x, then the flag, which gets the step's number seq (1,) int32 last."""
    x: torch.Tensor
    base: torch.Tensor
    at_flag: int
    at_ids: int
    at_late: int
    at_x: int
    seq: torch.Tensor


def locate(ids: torch.Tensor, loc: torch.Tensor, first: int, arena: torch.Tensor, stage_at: int, n_stage: int,
           slot_bytes: int, prefetched: tuple[torch.Tensor, torch.Tensor] | None = None,
           publish: Publish | None = None) -> torch.Tensor:
    """(3, R) offsets from arena's start for rows ids (R,) of the layer whose table entries start at loc[first]:
    now (readable at once: hot slots, experts a lookahead staged ahead, rows past n_stage read in place; SKIP for
    rows to stage), late (row r's staging slot stage_at + r * slot_bytes for a warm row r < n_stage, else SKIP)
    and every (now, or late). prefetched: (expert ids, their staged offsets or SKIP), from an earlier locate's
    late and the stage that filled it. publish: the staged rows for the host's share, in the same launch."""
    R = ids.numel()
    out = torch.empty((3, R), dtype=torch.int64, device=arena.device)
    pf_ids, pf_at = prefetched if prefetched is not None else (ids, out)  # unread when N_PF is 0
    p = publish or Publish(out, arena, 0, 0, 0, 0, ids)  # unused when PUBLISH is off
    _locate[(1,)](ids, loc, first, arena.numel(), stage_at, slot_bytes, pf_ids, pf_at, out, R, p.x, p.base, p.at_flag,
                  p.at_ids, p.at_late, p.at_x, p.seq, N_STAGE=n_stage, N_PF=0 if prefetched is None else pf_ids.numel(),
                  BLOCK=triton.next_power_of_2(max(R, 16)), PUBLISH=publish is not None,
                  N_X=p.x.numel() if publish is not None else 0, BLOCK_X=1024, ASM=ids.is_cuda)
    return out


@triton.jit
def _stage(ids_ptr, loc_ptr, first, base_ptr, late_ptr, n_words, PROGRAMS: tl.constexpr, WORDS: tl.constexpr,
           ROUNDS: tl.constexpr):
    """Program (p, row): copies rounds p, p + PROGRAMS, .. of the row's blob if the row has a staging slot."""
    p = tl.program_id(0)
    r = tl.program_id(1)
    dst = tl.load(late_ptr + r)
    if dst != SKIP_C:  # the others move nothing (a masked loop over them cost ~130 us a layer)
        src = tl.load(loc_ptr + first + tl.load(ids_ptr + r))
        src_words = (base_ptr + src).to(tl.pointer_type(tl.int32), bitcast=True)
        dst_words = (base_ptr + dst).to(tl.pointer_type(tl.int32), bitcast=True)
        i = tl.arange(0, WORDS)
        for j in range(ROUNDS):
            at = (p + j * PROGRAMS).to(tl.int64) * WORDS + i
            tl.store(dst_words + at, tl.load(src_words + at, mask=at < n_words), mask=at < n_words)


def stage(ids: torch.Tensor, loc: torch.Tensor, first: int, arena: torch.Tensor, late: torch.Tensor, blob_bytes: int,
          programs: int = STAGE_PROGRAMS) -> None:
    """Copies each row's warm blob (pinned host memory, at its table entry) to the staging slot late[r] gives it.
    Warm blobs are 256-byte aligned and padded: whole words copy. programs per row set how many SMs it takes
    from a matrix-vector product running beside it."""
    n_words = -(-blob_bytes // 4)
    _stage[(programs, ids.numel())](ids, loc, first, arena, late, n_words, PROGRAMS=programs, WORDS=STAGE_WORDS,
                                    ROUNDS=triton.cdiv(n_words, STAGE_WORDS * programs), num_warps=4)


@triton.jit
def _fence(x, ASM: tl.constexpr):
    """x, after a system-wide memory fence: stores before it are seen by the host (and by this GPU's later loads
    from host memory) before any that depend on x."""
    if ASM:
        return tl.inline_asm_elementwise("fence.sc.sys;\n mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                         is_pure=False, pack=1)
    return x


@triton.jit
def _spin(flag_ptr, seq, MAX_SPINS: tl.constexpr):
    """Read the int32 at flag_ptr until it holds seq, at most MAX_SPINS times (a host that never answers must not
    hang the stream): the last value read."""
    seen = tl.load(flag_ptr, volatile=True)
    tries = 0
    while (seen != seq) & (tries < MAX_SPINS):
        seen = tl.load(flag_ptr, volatile=True)
        tries += 1
    return seen


@triton.jit
def _await_staged(late_ptr, flag_ptr, seq_ptr, R, BLOCK_R: tl.constexpr, MAX_SPINS: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    staged = tl.sum((tl.load(late_ptr + r, mask=r < R, other=SKIP_C) != SKIP_C).to(tl.int32), axis=0)
    if staged > 0:
        _spin(flag_ptr, tl.load(seq_ptr), MAX_SPINS)


def await_staged(late: torch.Tensor, flag: torch.Tensor, seq: torch.Tensor) -> None:
    """The stream waits until flag (1,) int32 in VRAM holds seq, where any row is staged (late (R,) not SKIP): the
    host queues that flag after its copies of the staged rows (cpu_share.py). Bounded like silu_mul's wait for the
    host's rows: a host that never answers leaves garbage in the rows (and NaN from silu_mul), not a hang."""
    R = late.numel()
    _await_staged[(1,)](late, flag, seq, R, BLOCK_R=triton.next_power_of_2(R), MAX_SPINS=AWAIT_MAX_SPINS)


@dataclass(frozen=True)
class HostRows:
    """The host's first values of each staged row (late (R,) not SKIP), (R, width) float32 in pinned memory at
    base + at_out, valid once the int32 at base + at_flag holds the step's number seq (1,) int32."""
    late: torch.Tensor
    base: torch.Tensor
    at_flag: int
    at_out: int
    seq: torch.Tensor
    width: int


@triton.jit
def _silu_mul(parts_ptr, head_ptr, out_ptr, q_ptr, d_ptr, s_ptr, late_ptr, at_flag, at_out, seq_ptr, F, H,
              stride_mat, stride_part, S: tl.constexpr, BLOCK: tl.constexpr, Q8: tl.constexpr, HOST: tl.constexpr,
              ASM: tl.constexpr, MAX_SPINS: tl.constexpr):
    """Program (block of H + F, row): the row's first H values from head (H may be 0), then silu(gate) * up.
    HOST: head_ptr is HostRows' base, the host's rows at + at_out: a staged row's programs over them wait until the
    host's flag holds this step's number (the stream waits, not the host), then read them; other rows' are 0."""
    r = tl.program_id(1)
    n = H + F
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    f = c - H
    m = (c < n) & (f >= 0)
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(S):
        g += tl.load(parts_ptr + s * stride_part + r * F + f, mask=m, other=0.0)
        u += tl.load(parts_ptr + stride_mat + s * stride_part + r * F + f, mask=m, other=0.0)
    h = g / (1.0 + tl.exp(-g)) * u
    if HOST:
        head = tl.zeros((BLOCK,), dtype=tl.float32)
        if (tl.program_id(0) * BLOCK < H) & (tl.load(late_ptr + r) != SKIP_C):
            seq = tl.load(seq_ptr)
            seen = _spin((head_ptr + at_flag).to(tl.pointer_type(tl.int32), bitcast=True), seq, MAX_SPINS)
            seen = _fence(seen, ASM)  # the loads below depend on it: they read what the host wrote before the flag
            rows = (head_ptr + at_out + (seen - seq)).to(tl.pointer_type(tl.float32), bitcast=True)
            head = tl.load(rows + r * H + c, mask=c < H, volatile=True)
            head = tl.where(seen == seq, head, float("nan"))  # a host that never answered: NaN, not a hang
        h = tl.where(c < H, head, h)
    else:
        h = tl.where(c < H, tl.load(head_ptr + r * H + c, mask=c < H, other=0.0), h)
    tl.store(out_ptr + r * n + c, h, mask=c < n)
    if Q8:  # n is a multiple of 32: whole q8_1 blocks, masked by block
        q, d, sums = q8_1_blocks(tl.reshape(h, (BLOCK // 32, 32)))
        at = tl.reshape(c, (BLOCK // 32, 32))
        tl.store(q_ptr + r * n + at, q.to(tl.int8), mask=at < n)
        blk = tl.program_id(0) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        tl.store(d_ptr + r * (n // 32) + blk, d, mask=blk < n // 32)
        tl.store(s_ptr + r * (n // 32) + blk, sums, mask=blk < n // 32)


def silu_mul(parts: torch.Tensor, head: torch.Tensor | HostRows | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """(silu(gate) * up (R, F) from parts (2, S, R, F), the same as q8_1 (gemv_parts' xq), or None where F is not
    whole q8_1 blocks). head (R, H): values that go before each row's (the CPU's share of a staged expert's rows),
    or HostRows: those values as the host writes them, waited for here."""
    _, S, R, F = parts.shape
    host = isinstance(head, HostRows)
    H = 0 if head is None else head.width if host else head.shape[1]
    out = torch.empty((R, H + F), dtype=torch.float32, device=parts.device)
    xq = q8_1_empty(R, H + F, parts.device) if (H + F) % 32 == 0 else None
    q, d, s = xq or (out, out, out)  # unused pointers when there is no q8_1 output
    if host:
        head_t, late, at_flag, at_out, seq = head.base, head.late, head.at_flag, head.at_out, head.seq
    else:
        head_t, late, at_flag, at_out, seq = out if head is None else head.contiguous(), out, 0, 0, out
    BLOCK = 1024
    _silu_mul[(triton.cdiv(H + F, BLOCK), R)](parts, head_t, out, q, d, s, late, at_flag, at_out, seq, F, H,
                                              parts.stride(0), parts.stride(1), S=S, BLOCK=BLOCK, Q8=xq is not None,
                                              HOST=host, ASM=parts.is_cuda, MAX_SPINS=AWAIT_MAX_SPINS)
    return out, xq


@triton.jit
def _combine(parts_ptr, w_ptr, out_ptr, D, stride_part, S: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(1)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = d < D
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):  # slot order, as llama.cpp sums the weighted experts
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(S):
            y += tl.load(parts_ptr + s * stride_part + (t * K + j) * D + d, mask=m, other=0.0)
        acc += y * tl.load(w_ptr + t * K + j)
    tl.store(out_ptr + t * D + d, acc, mask=m)


def combine(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    S, _, D = parts.shape
    T, k = weights.shape
    out = torch.empty((T, D), dtype=torch.float32, device=parts.device)
    BLOCK = 1024
    _combine[(triton.cdiv(D, BLOCK), T)](parts, weights.float().contiguous(), out, D, parts.stride(0), S=S, K=k, BLOCK=BLOCK)
    return out
