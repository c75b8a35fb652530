"""The MoE block at decode with no host round trip: routing, expert lookup and the expert kernels stay on the GPU.

Shape key: T tokens (few: decode), k experts per token, R = T * k rows (row t * k + j is token t's j-th expert),
D embedding width, F expert FFN width.
Each row's expert is looked up in the location table (tiers/locations.py) with the routing the GPU computed; a warm
expert's blob is copied from pinned host memory into a staging slot by a kernel on a side stream (no host
involved) while the hot rows' gate and up compute from their slots; then the staged rows' gate and up, and every
row's down. With a CPU share (cpu_share.py) the host, told the layer's warm experts by the GPU, has the copy engine
stage the GPU's part of each (gate's and up's later rows, all of down) and computes silu(gate) * up of the first
rows itself. Optionally a gate lookahead stages a later layer's predicted warm experts ahead of time (Lookahead).
After each step its routing is copied to pinned host memory (snapshot); the host counts it while the next step
runs (account) and lets the policy promote misses into slots with copies that never make compute wait.
Larger batches (prefill) read the routing back and take moe_gpu.moe_ffn_gpu, which streams whole experts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from moe_tier.cpu_share import CpuShare, plan_cuts
from moe_tier.host_tiers import blob_layout
from moe_tier.kernels.gpu_gemv import SKIP, gemv_parts, gemv_split, has_kernel
from moe_tier.kernels.gpu_moe_decode import combine, locate, router_topk, silu_mul, stage
from moe_tier.kernels.gpu_q8_1 import carried_q8_1, quantize_q8_1
from moe_tier.moe import Routing
from moe_tier.moe_gpu import DECODE_MAX_ROWS, aligned, gate_up_parts, moe_ffn_gpu
from moe_tier.reader import ExpertId
from moe_tier.tensors import Weights, matrix_dims
from moe_tier.tiers.gpu_pool import GpuTiers


# How much faster than the link the CPU must run a warm expert before decode reads routing back to let it: that
# path gives up the step's CUDA graph and waits on the host every layer. On an H200 host measuring CPU 50 and link
# 54 GB/s, 8 Mixtral-shaped layers with 1 in 8 uses warm took 25.8 ms a token read back, 5.9 ms on the device path.
CPU_PATH_MARGIN = 2.0


def _live() -> bool:
    """Whether launches run (not recorded into a CUDA graph): the host may then serve its share inline."""
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def device_path_possible(tiers: GpuTiers) -> str | None:
    """None if every expert can be reached from a kernel (hot or pinned), each layer's experts share one blob
    layout and the CPU is not CPU_PATH_MARGIN times faster than the link at a warm expert (the device path stages
    every miss); else why not (then the engine reads routing back every layer and the cost model places each miss)."""
    if len(tiers.warm.offset) < len(tiers.desc.experts):
        return "some experts are cold (not pinned): a kernel cannot read the file"
    speeds = tiers.speeds
    if (len(tiers.table.slot_of) < len(tiers.desc.experts)
            and speeds.cpu_bytes_per_s > CPU_PATH_MARGIN * speeds.h2d_bytes_per_s):
        return (f"the CPU runs a warm expert ({speeds.cpu_bytes_per_s / 1e9:.1f} GB/s) in well under the time the link "
                f"copies it ({speeds.h2d_bytes_per_s / 1e9:.1f} GB/s): misses are computed on the CPU")
    layers: dict[int, set] = {}
    for eid, ref in tiers.desc.experts.items():
        layers.setdefault(eid.layer, set()).add(tuple((p.matrix, p.qtype, p.shape) for p in ref.parts))
    if any(len(kinds) > 1 for kinds in layers.values()):
        return "a layer's experts differ in quant type or shape"
    if not all(aligned(blob_layout(ref).values()) for ref in tiers.desc.experts.values()):
        return "an expert's matrices do not start 16-byte aligned in its blob (the decode kernels' wide loads)"
    return None


@dataclass(frozen=True)
class Lookahead:
    """Layer `target`'s router applied to the FFN input of an MoE layer `distance` layers before it, the norm
    weights folded in (router_predict/lookahead.py measured it): predicts target's experts early, so that their
    staging runs while the layers before compute."""
    target: int
    distance: int
    matrix: torch.Tensor  # (E, D) float32 on the target layer's GPU
    bias: torch.Tensor | None  # the router's own bias, added to its logits
    select_bias: torch.Tensor | None  # a selection bias (exp_probs_b), as route_topk takes it


def lookaheads(weights: Weights, tiers: GpuTiers, distance: int = 1) -> dict[int, Lookahead]:
    """For each MoE layer, the router of the MoE layer `distance` after it with both FFN norms folded in
    (h / w_l * w_target: a router reads a normalised residual scaled by its own layer's norm), on the GPU that
    holds the target layer's warm experts' reads."""
    out = {}
    moe_layers = tiers.desc.moe_layers
    for layer, target in zip(moe_layers, moe_layers[distance:]):
        norm, norm_next = (weights.vector(f"blk.{il}.ffn_norm.weight") for il in (layer, target))
        if norm is None or norm_next is None:
            continue
        router = weights.matrix(f"blk.{target}.ffn_gate_inp.weight")
        scale = np.divide(norm_next, norm, out=np.zeros_like(norm_next), where=norm != 0)
        device = tiers.arena[tiers.layer_gpu[target]].device
        vectors = [weights.vector(f"blk.{target}.{name}.bias") for name in ("ffn_gate_inp", "exp_probs_b")]
        bias, select_bias = (None if v is None else torch.from_numpy(v).float().to(device) for v in vectors)
        matrix = router.rows(np.arange(router.n_rows)) * scale[None, :]
        out[layer] = Lookahead(target, distance, torch.from_numpy(np.ascontiguousarray(matrix, np.float32)).to(device),
                               bias, select_bias)
    return out


class DeviceMoE:
    """ops.moe for the GPU backend when device_path_possible(): decode on the device, prefill as moe_ffn_gpu.

    With lookaheads of distance d and staging slots for (d + 2) k rows: k demand slots, and a ring of d + 1
    buffers of k where the lookahead of each layer stages the predicted warm experts of the layer d later (a
    buffer is refilled only after the layer that read it last was queued), on a low-priority stream that never
    holds up a demand copy in its queue."""

    def __init__(self, tiers: GpuTiers, lookahead: dict[int, Lookahead] | None = None, cpu_share: float = 0.0):
        self.tiers = tiers
        c = tiers.desc.config
        self.first_layer = min(e.layer for e in tiers.desc.experts)
        self.parts = {}  # layer -> (gate, up, down parts of one of its experts, their blob offsets, blob bytes)
        for eid, ref in tiers.desc.experts.items():
            if eid.layer not in self.parts:
                self.parts[eid.layer] = (ref.part("gate"), ref.part("up"), ref.part("down"), blob_layout(ref), ref.n_bytes)
        cuts = plan_cuts(tiers.desc.experts, cpu_share)  # where the CPU computes a share of each staged expert
        self.cpu = CpuShare(tiers, cuts) if cuts else None
        k = c.n_expert_used
        self.lookahead = {layer: la for layer, la in (lookahead or {}).items()
                          if tiers.stage_slots.get(tiers.layer_gpu[la.target], 0) >= (la.distance + 2) * k}
        ring = max((la.distance + 1 for la in self.lookahead.values()), default=1)
        self.buffer = {layer: i % ring for i, layer in enumerate(sorted(self.parts))}  # its ring buffer as a target
        # target layer -> (GPU, predicted ids, their staging offsets or SKIP, event: those known, event: copied)
        self.ahead: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event, torch.cuda.Event]] = {}
        # this step's (layer, ids (T, k), experts staged ahead for it (k,) with -1 where none) on the device
        self.step: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.capturing = False  # inside a CUDA graph capture (gpu_graph.py): no host reads here
        self._host: torch.Tensor | None = None  # pinned copy of a step's routing and prefetches (layers, R + k)
        self._copied: torch.cuda.Event | None = None
        self._seen: tuple[list[int], int, frozenset[ExpertId]] | None = None  # its layers, R, the experts ready
        self.streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}

    def __call__(self, x: torch.Tensor, routing: Routing, layer: int) -> torch.Tensor:
        if layer == self.first_layer and not self.capturing:
            self.account()
        if layer == self.first_layer and self.cpu is not None and _live():
            self.cpu.begin_step()
        if routing.ids.numel() > DECODE_MAX_ROWS:
            self.ahead.clear()
            return moe_ffn_gpu(x, routing.host(), layer, self.tiers)
        ahead = self.ahead.pop(layer, None)
        staged_ahead = None
        if ahead is not None:
            device = self.tiers.arena[ahead[0]].device
            torch.cuda.current_stream(device).wait_event(ahead[3])  # the lookahead's choice (not its copy)
            with torch.cuda.device(device):
                staged_ahead = torch.where(ahead[2] != SKIP, ahead[1], -1)
        self.step.append((layer, routing.ids, staged_ahead))
        if layer in self.lookahead and len(x) == 1:
            self._predict(x, layer)  # queued first: its stream must not wait for this layer's compute
        out = None
        for gpu, arena in self.tiers.arena.items():  # each expert is computed on one GPU, skipped elsewhere
            with torch.cuda.device(arena.device):  # Triton launches on the current device's stream
                y = self._rows_on(gpu, x.to(arena.device), routing, layer,
                                  ahead if ahead is not None and ahead[0] == gpu else None).to(x.device)
            out = y if out is None else out + y
        return out

    def _rows_on(self, gpu: int, x: torch.Tensor, routing: Routing, layer: int, ahead) -> torch.Tensor:
        """(T, D): the layer's experts of each token that GPU gpu computes (the others skipped), weighted and
        summed in slot order, as llama.cpp. Warm rows are staged on a side stream while the hot rows (and those
        staged ahead) compute their gate and up (PCIe and HBM busy at once); theirs follow, then every row's
        down. With a CPU share, the host has the copy engine stage the GPU's part of a warm expert and computes
        the first rows of its gate and up meanwhile (cpu_share.py)."""
        gate, up, down, at, blob_bytes = self.parts[layer]
        n_ff, n_embd = matrix_dims(gate.shape)
        tiers, arena, first = self.tiers, self.tiers.arena[gpu], layer * self.tiers.desc.config.n_expert
        ids, loc, n_stage = routing.ids.reshape(-1).to(arena.device), tiers.locations.loc[gpu], tiers.stage_slots[gpu]
        if self.lookahead:
            n_stage = min(n_stage, tiers.desc.config.n_expert_used)  # the rest are the lookahead's buffers
        cut = self.cpu.cuts.get(layer) if self.cpu is not None and n_stage else None
        point, hand = self.cpu.publish(gpu, layer, len(ids), x) if cut is not None else (None, None)
        now, late, every = locate(ids, loc, first, arena, tiers.stage_at[gpu], n_stage, tiers.slot_bytes,
                                  None if ahead is None else ahead[1:3], hand)
        split = gemv_split(gate.qtype, n_ff, n_embd, len(ids), 2, device=x.device)
        whole = n_stage and cut is None  # the stage kernel copies whole blobs; hot and staged rows share one buffer
        gate_up = torch.empty((2, 2 * split if whole else split, len(ids), n_ff), dtype=torch.float32, device=x.device)
        main = torch.cuda.current_stream()
        if whole:
            side = self._stream(arena.device, "demand")
            side.wait_stream(main)
            with torch.cuda.stream(side):
                stage(ids, loc, first, arena, late, blob_bytes)
        if ahead is not None:
            main.wait_event(ahead[4])  # the experts staged ahead are read with the hot ones
        xq = None  # x as q8_1, once for gate and up (the norm before may have written it)
        if has_kernel(gate.qtype, n_embd):
            xq = carried_q8_1(x) or quantize_q8_1(x.float().contiguous())
        gate_up_parts(x, xq, arena, now, gate, up, at, gate_up[:, :split])
        if cut is None:
            if n_stage:
                main.wait_stream(side)
                gate_up_parts(x, xq, arena, late, gate, up, at, gate_up[:, split:])
            h, hq = silu_mul(gate_up)
            down_parts = gemv_parts(h, arena, every, down.qtype, n_embd, n_ff, (at["down"],), xq=hq)[0]
            return combine(down_parts, routing.weights.to(arena.device))
        # The hot rows; then the staged rows once the copy engine has the GPU's part (gate and up rows [f, F), all
        # of down) and the host its silu(gate) * up of rows [0, f).
        S = gemv_split(down.qtype, n_embd, n_ff, len(ids), device=x.device)
        parts = torch.empty((1, 2 * S, len(ids), n_embd), dtype=torch.float32, device=x.device)
        h, hq = silu_mul(gate_up)
        gemv_parts(h, arena, now, down.qtype, n_embd, n_ff, (at["down"],), xq=hq, out=parts[:, :S])
        if _live():
            self.cpu.serve([point])  # eager: the host queues the GPU's copies and computes its part now
        self.cpu.await_staged(point, late)
        late_gate_up = gate_up_parts(x, xq, arena, late, gate, up, cut.gate_up_at, rows=n_ff - cut.rows)
        h_late, hq_late = silu_mul(late_gate_up, head=self.cpu.rows(point, late))  # waits for the host's rows
        gemv_parts(h_late, arena, late, down.qtype, n_embd, n_ff, (at["down"],), xq=hq_late, out=parts[:, S:])
        return combine(parts[0], routing.weights.to(arena.device))

    def _predict(self, x: torch.Tensor, layer: int) -> None:
        """Queue the lookahead of `layer`: a later MoE layer's experts by its router on this layer's input, and
        the copy of the warm ones into that layer's buffer."""
        la, tiers, k = self.lookahead[layer], self.tiers, self.tiers.desc.config.n_expert_used
        gpu = tiers.layer_gpu[la.target]
        arena, c = tiers.arena[gpu], tiers.desc.config
        main, side = torch.cuda.current_stream(arena.device), self._stream(arena.device, "ahead")
        side.wait_stream(main)  # x is ready; the buffer's last reader (d + 1 layers before the target) is queued
        with torch.cuda.device(arena.device), torch.cuda.stream(side):
            pred = router_topk(x.to(arena.device), la.matrix, la.bias, la.select_bias, k, c.gating, False,
                               1.0).ids.reshape(-1)
            at = tiers.stage_at[gpu] + k * (1 + self.buffer[la.target]) * tiers.slot_bytes
            first = la.target * c.n_expert
            late = locate(pred, tiers.locations.loc[gpu], first, arena, at, k, tiers.slot_bytes)[1]
            chosen, done = torch.cuda.Event(), torch.cuda.Event()
            chosen.record(side)
            stage(pred, tiers.locations.loc[gpu], first, arena, late, self.parts[la.target][4])
            done.record(side)
        for t in (pred, late):
            t.record_stream(main)  # read by the target layer on the compute stream
        self.ahead[la.target] = (gpu, pred, late, chosen, done)

    def _stream(self, device: torch.device, role: str) -> torch.cuda.Stream:
        """Per GPU: "demand" stages this layer's warm experts (high priority), "ahead" the next layer's."""
        if (device, role) not in self.streams:
            self.streams[device, role] = torch.cuda.Stream(device, priority=-1 if role == "demand" else 0)
        return self.streams[device, role]

    def snapshot(self) -> None:
        """Queue this step's routing and prefetches to pinned host memory for the next account() (no wait here)
        and note which experts the step found in slots (the table it was queued with)."""
        if not self.step:
            return
        device, k = self.step[0][1].device, self.tiers.desc.config.n_expert_used
        if all(ahead is None for _, _, ahead in self.step):  # no lookahead: one launch, as before it existed
            rows = torch.stack([ids.reshape(-1).to(device) for _, ids, _ in self.step])
        else:
            none = torch.full((k,), -1, dtype=torch.int32, device=device)
            rows = torch.stack([torch.cat([ids.reshape(-1).to(device), none if ahead is None else ahead.to(device)])
                                for _, ids, ahead in self.step])  # each layer's routing on its layer's GPU
        if self._host is None or self._host.shape != rows.shape:
            self._host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        self._host.copy_(rows, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(device))
        self._seen = ([layer for layer, _, _ in self.step], self.step[0][1].numel(), frozenset(self.tiers.locations.ready))
        self.step = []

    def account(self) -> None:
        """Count the last snapshot's hits; then the live planner decides each layer step's promotions (the misses it
        gives a slot; no prefetches on this path: live_planner.py says why), or the policy is told every use and
        promotes the misses it prefers (copies queue; nobody waits). Runs at each step's first MoE layer (eager
        steps) or right after the next step's graph is queued, so that it overlaps the GPU's work; the engine calls
        it once more after the last step."""
        tiers, stats = self.tiers, self.tiers.stats
        if self._seen is None:
            self.snapshot()  # an eager step: its routing is read now
        used = []
        if self._seen is not None:
            layers, n_rows, ready = self._seen
            t0 = time.perf_counter()
            self._copied.synchronize()  # long done when a step's logits were read since
            rows = self._host.numpy()  # (layers, R [+ k]): routing, then any experts staged ahead (-1: none)
            stats.waited("routing gpu->host", time.perf_counter() - t0)
            for layer, row in zip(layers, rows):
                cut = self.cpu.cuts.get(layer) if self.cpu is not None else None
                cpu_bytes = cut.cpu_bytes if cut is not None else 0  # a staged expert's bytes the CPU computed
                ids, counts = np.unique(row[:n_rows], return_counts=True)
                wanted = [ExpertId(layer, int(e)) for e in ids]
                ahead = {ExpertId(layer, int(e)) for e in row[n_rows:] if e >= 0}
                for eid in ahead:
                    stats.moved("warm->gpu ahead", tiers.desc.experts[eid].n_bytes)
                for eid in wanted:
                    n_bytes = tiers.desc.experts[eid].n_bytes
                    if tiers.policy is not None:
                        tiers.policy.touch(eid)
                    if eid in ready:
                        stats.served("hot", n_bytes)
                    elif eid in ahead:
                        stats.served("ahead", n_bytes)  # warm, staged while the layer before ran
                    else:
                        stats.served("warm", n_bytes)
                        if cpu_bytes:
                            stats.moved("warm->cpu share", cpu_bytes)
                        stats.moved("warm->gpu read", n_bytes - cpu_bytes)
                used.append((layer, dict(zip(ids.tolist(), counts.tolist()))))  # expert -> tokens
            self._seen = None
        tiers.settle()
        if tiers.planner is not None:
            step_s = tiers.planner.tick(len(used))
            share = self.cpu.fraction() if self.cpu is not None else 0.0
            for layer, tokens in used:
                tiers.planned(layer, tokens, step_s, share, read_back=False)
            return
        for layer, tokens in used:
            wanted = [ExpertId(layer, e) for e in tokens]
            for eid in wanted:
                if eid not in tiers.table.slot_of:
                    tiers.promote(eid, tiers.layer_gpu[layer], frozenset(wanted))
