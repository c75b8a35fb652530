"""Single-token decode steps replayed as CUDA graphs: one launch per token instead of about forty per layer.

At batch 1 the GPU finishes a layer's small kernels faster than Python can queue them, so an eager step costs the
Python time. With routing on the device (moe_decode.DeviceMoE) a decode step has no host round trip, so it can be
captured once and replayed: the token's embedding, position and rope angles go into fixed input buffers, the
step attends over the first n_keys cache entries (captured per bucket of BUCKET_KEYS positions, later entries
masked), and the expert location table is read at replay time, so slot changes between steps need no new
capture. While a replay runs, the host counts the previous step's experts and queues promotions (DeviceMoE.account:
they take effect from the next replay), then computes its share of each layer's staged experts as the GPU reaches
the layer (cpu_share.CpuShare.serve). Nothing the host does meanwhile may wait for the stream: the replay waits
on the host.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from moe_tier.gpu_ops import GpuOps, StaticStep
from moe_tier.layers import KVCache, rope_angles
from moe_tier.models import Segment
from moe_tier.models.base import MoEDecoder
from moe_tier.moe_decode import DeviceMoE

# A graph attends over a multiple of this many cache entries (later ones masked). Its parts of MIN_SPLIT_KEYS keys
# run side by side, so a wide bucket adds little time a step, while each new bucket costs a capture (~0.2 s on an
# H200): at 256 one fell inside a 256-token benchmark run after a 512-token prompt.
BUCKET_KEYS = 1024


class DecodeGraphs:
    def __init__(self, model: MoEDecoder, ops: GpuOps, moe: DeviceMoE):
        self.model, self.ops, self.moe = model, ops, moe
        c = model.cfg
        dev = ops.device
        half = c.n_rot // 2
        # x, cos and sin arrive in one copy from pinned memory: a copy from pageable memory blocks the host, and the
        # GPU idles from the previous step's logits to this replay.
        self.host_in = torch.zeros(c.n_embd + 2 * half, dtype=torch.float32, pin_memory=True)
        self.dev_in = torch.zeros(c.n_embd + 2 * half, dtype=torch.float32, device=dev)
        x, cos, sin = self.dev_in.split([c.n_embd, half, half])
        self.inputs = StaticStep(x.view(1, -1), torch.zeros(1, dtype=torch.int64, device=dev), cos.view(1, -1),
                                 sin.view(1, -1), 0)
        self.copied = torch.cuda.Event()  # the last copy out of host_in
        self.pool = torch.cuda.graph_pool_handle()
        self.cache: KVCache | None = None  # the sequence the graphs write into (they hold its addresses)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, list, list]] = {}  # n_keys -> graph

    def step(self, cache: KVCache, token: int) -> torch.Tensor:
        """Logits (1, V) of `token` at position cache.length; advances the cache like model.forward."""
        c, pos = self.model.cfg, cache.length
        n_keys = min(cache.ctx, -(-(pos + 1) // BUCKET_KEYS) * BUCKET_KEYS)
        cos, sin = rope_angles(pos, 1, c.n_rot, c.rope_freq_base, c.rope_freq_scale)
        self.copied.synchronize()  # long done: the previous step's logits were read
        np.concatenate([self.ops.embed_rows(np.array([token]))[0], cos[0], sin[0]], out=self.host_in.numpy())
        self.dev_in.copy_(self.host_in, non_blocking=True)
        self.copied.record()
        self.inputs.pos.fill_(pos)
        if cache is not self.cache:  # a new sequence: its cache lives elsewhere, the old graphs go with the old one
            self.cache, self.graphs = cache, {}
        if n_keys not in self.graphs:
            self.graphs[n_keys] = self._capture(cache, n_keys)
        graph, logits, routed, points = self.graphs[n_keys]
        if self.moe.cpu is not None:
            self.moe.cpu.begin_step()
        graph.replay()
        self.moe.account()  # the previous step's experts, counted while the GPU runs this one; promotions queue
        if self.moe.cpu is not None:
            self.moe.cpu.serve(points)  # the CPU's share of each layer's staged experts, as the GPU reaches it
        self.moe.step = list(routed)  # the graph's routing buffers, copied to the host after this replay
        self.moe.snapshot()
        cache.length = pos + 1
        return logits

    def _capture(self, cache: KVCache, n_keys: int):
        """Warm up (Triton compiles) on a side stream, then capture one step; the cache length is restored."""
        ops, moe = self.ops, self.moe
        ops.static = replace(self.inputs, n_keys=n_keys)
        length = cache.length
        moe.capturing = True
        try:
            side = torch.cuda.Stream(ops.device)
            side.wait_stream(torch.cuda.current_stream(ops.device))
            with torch.cuda.stream(side):
                self._forward(cache)
            torch.cuda.current_stream(ops.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            moe.step = []
            if moe.cpu is not None:
                moe.cpu.step = []
            with torch.cuda.device(ops.device), torch.cuda.graph(graph, pool=self.pool):  # captures on ops' GPU
                logits = self._forward(cache)
            routed, points = list(moe.step), list(moe.cpu.step) if moe.cpu is not None else []
        finally:
            ops.static, moe.capturing, cache.length = None, False, length
            moe.step = []
        return graph, logits, routed, points

    def _forward(self, cache: KVCache) -> torch.Tensor:
        length = cache.length
        out = self.model.forward(np.zeros(1, dtype=np.int64), [Segment(cache, 0, 1)], last_only=True)
        cache.length = length
        return out
