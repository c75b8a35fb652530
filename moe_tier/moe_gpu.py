"""The MoE block on GPU slots: acquire the layer's experts, grouped matmuls over slot blobs, weighted sum.

Shape key: T tokens, D embedding width, k experts per token, F expert FFN width,
M rows sent to one GPU group = sum over its experts of the tokens that chose each (tokens sorted by expert).
Experts the cost model leaves on the CPU run through the numba kernels on their warm blob (or the file map).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from moe_tier.host_tiers import blob_layout
from moe_tier.kernels.gpu import DEQUANT_MIN_ROWS, matmul_dequantized, moe_matmul
from moe_tier.kernels.gpu_gemv import gemv, gemv_parts, gemv_split
from moe_tier.kernels.gpu_moe_decode import silu_mul
from moe_tier.moe import Routing, swiglu_ffn
from moe_tier.reader import ExpertId, ExpertPart
from moe_tier.tensors import matrix_dims
from moe_tier.tiers.gpu_pool import GpuTiers

DECODE_MAX_ROWS = 8  # tokens x experts per token up to which each row reads its own expert's matrices


def moe_ffn_gpu(x: torch.Tensor, routing: Routing, layer: int, tiers: GpuTiers) -> torch.Tensor:
    """x (T, D) on a GPU -> (T, D) float32; the k weighted expert outputs are added in slot order, as llama.cpp."""
    ids, weights = routing.ids, routing.weights
    experts, counts = np.unique(ids, return_counts=True)
    acquired = tiers.acquire(layer, dict(zip(experts.tolist(), counts.tolist())))
    per_slot = torch.zeros((ids.shape[1], ids.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)  # (k, T, D)
    if acquired.cpu:  # before the GPU's experts are queued, so that the CPU's run while they compute
        t0 = time.perf_counter()
        x_host = host_copy(x)
        tiers.stats.waited("activations gpu->host", time.perf_counter() - t0)
    for gpu, held in acquired.gpu.items():
        with torch.cuda.device(tiers.arena[gpu].device):  # Triton launches on the current device's stream
            for group in _groups(tiers, held):
                _grouped_swiglu(x, routing, group, tiers.arena[gpu], tiers, per_slot)
    if acquired.cpu:
        for eid, w in acquired.cpu:
            tok, slot = np.nonzero(ids == eid.expert)
            y = swiglu_ffn(x_host[tok], w.gate, w.up, w.down) * weights[tok, slot][:, None]
            per_slot[_dev(slot, x.device), _dev(tok, x.device)] = _dev(y, x.device)
    return per_slot.sum(dim=0)


def _groups(tiers: GpuTiers, held: list[tuple[ExpertId, int]]) -> list[list[tuple[ExpertId, int]]]:
    """Experts whose matrices share types and shapes go in one launch (all of a layer, except odd legacy files)."""
    groups: dict[tuple, list] = {}
    for eid, offset in held:
        key = tuple((p.matrix, p.qtype, p.shape) for p in tiers.desc.experts[eid].parts)
        groups.setdefault(key, []).append((eid, offset))
    return list(groups.values())


def _grouped_swiglu(x, routing: Routing, group, arena: torch.Tensor, tiers: GpuTiers, per_slot) -> None:
    """down(silu(gate x) * up x) for every expert of the group, rows sorted by expert: a few rows through the
    matrix-vector kernels (each row its expert's matrices), more through the grouped kernel, prefill-sized ones
    through float16 cuBLAS."""
    dev = arena.device
    toks, slots, seg = [], [], [0]
    for eid, _ in group:
        tok, slot = np.nonzero(routing.ids == eid.expert)
        toks.append(tok)
        slots.append(slot)
        seg.append(seg[-1] + len(tok))
    tok, slot = np.concatenate(toks), np.concatenate(slots)
    seg_t = _dev(np.asarray(seg, np.int32), dev)
    max_rows = int(np.diff(seg).max())
    ref = tiers.desc.experts[group[0][0]]
    layout = blob_layout(ref)

    def matmul(h: torch.Tensor, matrix: str) -> torch.Tensor:
        part = ref.part(matrix)
        at = np.array([off + layout[matrix] for _, off in group], np.int64)
        if max_rows >= DEQUANT_MIN_ROWS:  # prefill: each expert's matrix decoded to float16 for cuBLAS
            return torch.cat([matmul_dequantized(h[seg[i] : seg[i + 1]], arena, int(a), part.qtype,
                                                 *matrix_dims(part.shape)) for i, a in enumerate(at)])
        return moe_matmul(h, arena, _dev(at, dev), seg_t, max_rows, part.qtype, *matrix_dims(part.shape))

    xg = x.to(dev)[_dev(tok, dev)]  # (M, D)
    if len(tok) <= DECODE_MAX_ROWS and aligned(off + at for _, off in group for at in layout.values()):
        # decode: each row reads its own expert's matrices (the matrix-vector kernels' wide loads need alignment)
        rows = _dev(np.repeat(np.array([off for _, off in group], np.int64), np.diff(seg)), dev)
        gate, up, down = (ref.part(m) for m in ("gate", "up", "down"))
        h, hq = silu_mul(gate_up_parts(xg, None, arena, rows, gate, up, layout))
        y = gemv(h, arena, rows, down.qtype, *matrix_dims(down.shape), part_offset=layout["down"], xq=hq)
    else:
        y = matmul(F.silu(matmul(xg, "gate")) * matmul(xg, "up"), "down")  # (M, D)
    y = y * _dev(routing.weights[tok, slot], dev)[:, None]
    per_slot[_dev(slot, per_slot.device), _dev(tok, per_slot.device)] = y.to(per_slot.device)


def gate_up_parts(x: torch.Tensor, xq, arena: torch.Tensor, offsets: torch.Tensor, gate: ExpertPart, up: ExpertPart,
                  at: dict[str, int], out: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """(2, S, R, F): gate and up of each row's expert, x's rows shared by R / len(x) rows each (a token's k
    experts); one launch where both have one quant type. xq: x as q8_1 where a kernel takes it; out: where to
    write (its S fixed by the caller); rows: only that many rows of each matrix, from where `at` points."""
    n_ff, n_embd = matrix_dims(gate.shape)
    n_ff = n_ff if rows is None else rows
    k = len(offsets) // len(x)
    if out is None:
        out = torch.empty((2, gemv_split(gate.qtype, n_ff, n_embd, len(offsets), 2, device=x.device), len(offsets), n_ff),
                          dtype=torch.float32, device=x.device)
    if gate.qtype == up.qtype:
        return gemv_parts(x, arena, offsets, gate.qtype, n_ff, n_embd, (at["gate"], at["up"]), x_div=k, out=out, xq=xq)
    for m, p in enumerate((gate, up)):
        gemv_parts(x, arena, offsets, p.qtype, n_ff, n_embd, (at[p.matrix],), x_div=k, out=out[m : m + 1],
                   xq=xq if p.qtype == gate.qtype else None)
    return out


def aligned(offsets: Iterable[int]) -> bool:
    """Every matrix starts 16-byte aligned (slots and blobs do; parts of odd sizes might not)."""
    return all(o % 16 == 0 for o in offsets)


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device through the caching pinned allocator: an async copy, no stream synchronisation."""
    return torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)


def host_copy(x: torch.Tensor) -> np.ndarray:
    """The one place the MoE block waits for the GPU: activations for experts computed on the CPU (the routing
    was read back after them, so this wait is short)."""
    return x.detach().float().cpu().numpy()
