"""The MoE block at decode with no host round trip: routing, expert lookup and the expert kernels stay on the GPU.

Shape key: T tokens (few: decode), k experts per token, R = T * k rows (row t * k + j is token t's j-th expert),
D embedding width, F expert FFN width.
Each row's expert is looked up in the location table (tiers/locations.py) with the routing the GPU computed; a warm
expert's blob is copied from pinned host memory into a staging slot by a kernel on a side stream (no host
involved) while the hot rows' gate and up compute from their slots; then the staged rows' gate and up, and every
row's down. After each step
its routing is copied to pinned host memory (snapshot); the host counts it while the next step runs (account) and
lets the policy promote misses into slots with copies that never make compute wait.
Larger batches (prefill) read the routing back and take moe_gpu.moe_ffn_gpu, which streams whole experts.
"""

from __future__ import annotations

import time

import torch

from moe_tier.host_tiers import blob_layout
from moe_tier.kernels.gpu_gemv import gemv_parts, gemv_split
from moe_tier.kernels.gpu_moe_decode import combine, locate, silu_mul, stage
from moe_tier.moe import Routing
from moe_tier.moe_gpu import moe_ffn_gpu
from moe_tier.reader import ExpertId
from moe_tier.tensors import matrix_dims
from moe_tier.tiers.gpu_pool import GpuTiers

DECODE_MAX_ROWS = 8  # tokens x experts per token up to which each row reads its own expert's matrices


def device_path_possible(tiers: GpuTiers) -> str | None:
    """None if every expert can be reached from a kernel (hot or pinned) and each layer's experts share one blob
    layout; else why not (then the engine reads routing back every layer)."""
    if len(tiers.warm.offset) < len(tiers.desc.experts):
        return "some experts are cold (not pinned): a kernel cannot read the file"
    layers: dict[int, set] = {}
    for eid, ref in tiers.desc.experts.items():
        layers.setdefault(eid.layer, set()).add(tuple((p.matrix, p.qtype, p.shape) for p in ref.parts))
    if any(len(kinds) > 1 for kinds in layers.values()):
        return "a layer's experts differ in quant type or shape"
    return None


class DeviceMoE:
    """ops.moe for the GPU backend when device_path_possible(): decode on the device, prefill as moe_ffn_gpu."""

    def __init__(self, tiers: GpuTiers):
        self.tiers = tiers
        self.first_layer = min(e.layer for e in tiers.desc.experts)
        self.parts = {}  # layer -> (gate, up, down parts of one of its experts, their blob offsets, blob bytes)
        for eid, ref in tiers.desc.experts.items():
            if eid.layer not in self.parts:
                self.parts[eid.layer] = (ref.part("gate"), ref.part("up"), ref.part("down"), blob_layout(ref), ref.n_bytes)
        self.step: list[tuple[int, torch.Tensor]] = []  # this step's (layer, ids (T, k)) on the device
        self.capturing = False  # inside a CUDA graph capture (gpu_graph.py): no host reads here
        self._host: torch.Tensor | None = None  # pinned copy of a step's routing (layers, T, k)
        self._copied: torch.cuda.Event | None = None
        self._seen: tuple[list[int], frozenset[ExpertId]] | None = None  # its layers, the experts ready then
        self.side: dict[torch.device, torch.cuda.Stream] = {}  # per GPU: the stream that stages warm experts

    def __call__(self, x: torch.Tensor, routing: Routing, layer: int) -> torch.Tensor:
        if layer == self.first_layer and not self.capturing:
            self.account()
        if routing.ids.numel() > DECODE_MAX_ROWS:
            return moe_ffn_gpu(x, routing.host(), layer, self.tiers)
        self.step.append((layer, routing.ids))
        out = None
        for gpu, arena in self.tiers.arena.items():  # each expert is computed on one GPU, skipped elsewhere
            with torch.cuda.device(arena.device):  # Triton launches on the current device's stream
                y = self._rows_on(gpu, x.to(arena.device), routing, layer).to(x.device)
            out = y if out is None else out + y
        return out

    def _rows_on(self, gpu: int, x: torch.Tensor, routing: Routing, layer: int) -> torch.Tensor:
        """(T, D): the layer's experts of each token that GPU gpu computes (the others skipped), weighted and
        summed in slot order, as llama.cpp. Warm rows are staged on a side stream while the hot rows' gate and up
        compute (PCIe and HBM busy at once); theirs follow, then every row's down."""
        gate, _, down, at, blob_bytes = self.parts[layer]
        n_ff, n_embd = matrix_dims(gate.shape)
        tiers, arena, first = self.tiers, self.tiers.arena[gpu], layer * self.tiers.desc.config.n_expert
        ids, loc, n_stage = routing.ids.reshape(-1).to(arena.device), tiers.locations.loc[gpu], tiers.stage_slots[gpu]
        now, late, every = locate(ids, loc, first, arena, tiers.stage_at[gpu], n_stage, tiers.slot_bytes)
        split = gemv_split(gate.qtype, n_ff, n_embd, len(ids), 2)
        gate_up = torch.empty((2, 2 * split if n_stage else split, len(ids), n_ff), dtype=torch.float32, device=x.device)
        if n_stage:
            main, side = torch.cuda.current_stream(), self._side(arena.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                stage(ids, loc, first, arena, late, blob_bytes)
            self._gate_up(x, arena, now, layer, gate_up[:, :split])
            main.wait_stream(side)
            self._gate_up(x, arena, late, layer, gate_up[:, split:])
        else:
            self._gate_up(x, arena, now, layer, gate_up)
        down_parts = gemv_parts(silu_mul(gate_up), arena, every, down.qtype, n_embd, n_ff, (at["down"],))[0]
        return combine(down_parts, routing.weights.to(arena.device))

    def _gate_up(self, x: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, layer: int, out: torch.Tensor) -> None:
        """Gate and up of each row's expert into out (2, S, R, F): one launch where both have one quant type."""
        gate, up, _, at, _ = self.parts[layer]
        n_ff, n_embd = matrix_dims(gate.shape)
        k = len(offsets) // len(x)
        if gate.qtype == up.qtype:
            gemv_parts(x, arena, offsets, gate.qtype, n_ff, n_embd, (at["gate"], at["up"]), x_div=k, out=out)
        else:
            for m, p in enumerate((gate, up)):
                gemv_parts(x, arena, offsets, p.qtype, n_ff, n_embd, (at[p.matrix],), x_div=k, out=out[m : m + 1])

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.side:
            self.side[device] = torch.cuda.Stream(device)
        return self.side[device]

    def snapshot(self) -> None:
        """Queue this step's routing to pinned host memory for the next account() (no wait here) and note which
        experts the step found in slots (the table it was queued with)."""
        if not self.step:
            return
        device = self.step[0][1].device  # with several GPUs each layer's routing is on its layer's GPU
        ids = torch.stack([ids.to(device) for _, ids in self.step])
        if self._host is None or self._host.shape != ids.shape:
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        self._host.copy_(ids, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(ids.device))
        self._seen = ([layer for layer, _ in self.step], frozenset(self.tiers.locations.ready))
        self.step = []

    def account(self) -> None:
        """Count the last snapshot's hits, tell the policy, promote what it prefers (copies queue; nobody waits).
        Runs at each step's first MoE layer (eager steps) or right after the next step's graph is queued, so
        that it overlaps the GPU's work; the engine calls it once more after the last step."""
        tiers, stats = self.tiers, self.tiers.stats
        if self._seen is None:
            self.snapshot()  # an eager step: its routing is read now
        used = []
        if self._seen is not None:
            layers, ready = self._seen
            t0 = time.perf_counter()
            self._copied.synchronize()  # long done when a step's logits were read since
            ids = self._host.numpy()  # (layers, T, k)
            stats.waited("routing gpu->host", time.perf_counter() - t0)
            for layer, layer_ids in zip(layers, ids):
                wanted = [ExpertId(layer, int(e)) for e in sorted(set(layer_ids.reshape(-1).tolist()))]
                for eid in wanted:
                    n_bytes = tiers.desc.experts[eid].n_bytes
                    tiers.policy.touch(eid)
                    if eid in ready:
                        stats.served("hot", n_bytes)
                    else:
                        stats.served("warm", n_bytes)
                        stats.moved("warm->gpu read", n_bytes)
                used.append((layer, wanted))
            self._seen = None
        tiers.settle()
        for layer, wanted in used:
            for eid in wanted:
                if eid not in tiers.table.slot_of:
                    tiers.promote(eid, tiers.layer_gpu[layer], frozenset(wanted))
