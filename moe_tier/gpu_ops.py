"""The GPU backend of the decoder: torch tensors on one device, dense weights uploaded once as raw GGUF
blocks and multiplied by the Triton kernels, an f16 KV cache on the device, experts through the GPU tiers.

Shape key as in models/base.py. Dense weights, norms, router and shared experts are always hot (the plan
reserved room for them); routed experts come from `moe`, normally moe_gpu.moe_ffn_gpu over the slot pool.
With device_routing (moe_decode.DeviceMoE), the router's top-k stays on the GPU and decode has one host round
trip per token (the sampler); otherwise the routing is read back at every MoE layer to pick slots.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from moe_tier.config import ModelConfig, RopeStyle
from moe_tier.kernels import gpu_decode_ops
from moe_tier.kernels.gpu import matmul
from moe_tier.kernels.gpu_gemv import gemv
from moe_tier.kernels.gpu_moe_decode import route_topk, router_topk
from moe_tier.kernels.gpu_q8_1 import carried_q8_1
from moe_tier.layers import KVCache, rope, rope_angles
from moe_tier.moe import Routing, route
from moe_tier.reader import Category
from moe_tier.tensors import QTensor, Weights

MoE = Callable[[torch.Tensor, Routing, int], torch.Tensor]


@dataclass
class StaticStep:
    """A single-token step's inputs at fixed device addresses, refilled before each replay of its graph."""

    x: torch.Tensor  # (1, D) the token's embedding
    pos: torch.Tensor  # (1,) int64, its position
    cos: torch.Tensor  # (1, n_rot / 2)
    sin: torch.Tensor
    n_keys: int  # cache entries attended (positions at or past pos are masked)


FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
SMALL_FLOAT_BYTES = 8 << 20  # float matrices up to this size are kept as float32 (the router: E x D)
GEMV_MAX_ROWS = 4  # up to this many tokens a dense matmul runs as matrix-vector products (bandwidth-bound)


def on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (CPU tensors run the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class GpuOps:
    def __init__(self, cfg: ModelConfig, weights: Weights, moe: MoE, device: torch.device, device_routing: bool = False,
                 layer_devices: dict[int, torch.device] | None = None):
        """device: the first GPU; layer_devices: where each layer's dense weights and KV cache live (the plan's
        split of layers over GPUs; default all on device). The head goes with the last layer, as the plan has it;
        activations move to a weight's GPU where they meet it, so only activations cross between cards."""
        self.cfg, self.w, self.moe, self.device, self.device_routing = cfg, weights, moe, device, device_routing
        self.layer_device = [(layer_devices or {}).get(il, device) for il in range(cfg.n_layer)]
        self._zeros = {d: torch.zeros(GEMV_MAX_ROWS, dtype=torch.int64, device=d)  # gemv offsets of a dense matrix
                       for d in set(self.layer_device)}
        self.static: StaticStep | None = None  # set while a decode step is captured into a CUDA graph
        self.head = "output" if "output.weight" in weights else "token_embd"
        self._blocks: dict[str, tuple[torch.Tensor, QTensor]] = {}
        self._vectors: dict[str, torch.Tensor | None] = {}
        self._rope_step: tuple[int, int] | None = None  # (start, n) of the step whose angles _rope holds
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # on each GPU
        for t in weights.desc.tensors.values():  # every dense matrix now: a first token must not wait on uploads
            if t.category is not Category.ROUTED and len(t.shape) > 1 and not t.name.startswith("token_embd"):
                self._upload(t.name)
        if self.head == "token_embd":
            self._upload("token_embd.weight")
        self._stacked: dict[tuple[str, ...], str] = {}  # (q, k, v) -> their rows stacked in one matrix
        for il in range(cfg.n_layer):
            self._stack([f"blk.{il}.attn_{m}" for m in "qkv"], f"blk.{il}.attn_qkv")

    def _stack(self, names: list[str], stacked: str) -> None:
        """GGUF blocks are row-major, so matrices of one type and width stacked by rows are one matrix."""
        mats = [self._blocks.get(f"{n}.weight") for n in names]
        if any(m is None or self.vector(f"{n}.bias") is not None for m, n in zip(mats, names)):
            return
        q0 = mats[0][1]
        if any(q.qtype != q0.qtype or q.n_cols != q0.n_cols or b.dtype != torch.uint8 for b, q in mats):
            return
        blocks = torch.cat([b.reshape(-1) for b, _ in mats])
        at = 0
        for n, (b, q) in zip(names, mats):  # each matrix becomes a view of the stack: no second copy stays
            self._blocks[f"{n}.weight"] = (blocks[at : at + b.numel()], q)
            at += b.numel()
        self._blocks[f"{stacked}.weight"] = (blocks, replace(q0, name=stacked, n_rows=sum(q.n_rows for _, q in mats)))
        self._stacked[tuple(names)] = stacked

    def _upload(self, name: str) -> tuple[torch.Tensor, QTensor]:
        """Raw GGUF blocks; a small float matrix as float32 values (its blocks would take the slow grouped kernel)."""
        if name not in self._blocks:
            q = self.w.matrix(name)
            data = np.asarray(q.data)
            if q.qtype in FLOAT_TYPES and data.nbytes <= SMALL_FLOAT_BYTES:
                data = dequantize(data, q.qtype).reshape(q.n_rows, q.n_cols).astype(np.float32)
            self._blocks[name] = (torch.from_numpy(np.array(data)).to(self._home(name)), q)
        return self._blocks[name]

    def _home(self, name: str) -> torch.device:
        """The GPU of a tensor's layer ("blk.N."); the head and output norm go with the last layer."""
        return self.layer_device[int(name.split(".")[1]) if name.startswith("blk.") else -1]

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with on(weight.device):
            return gpu_decode_ops.rms_norm(x.to(weight.device), weight, eps)  # one launch

    @staticmethod
    def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x + r and its norm in one launch, on the GPU of the norm's layer (activations move there)."""
        with on(weight.device):  # at decode the norm comes as q8_1 too, for the matrix-vector products it feeds
            return gpu_decode_ops.add_rms_norm(x.to(weight.device), r.to(weight.device), weight, eps,
                                               quant=len(x) <= GEMV_MAX_ROWS)

    silu = staticmethod(F.silu)
    sigmoid = staticmethod(torch.sigmoid)

    @staticmethod
    def empty_like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=x.device)

    @staticmethod
    def to_host(x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

    def vector(self, name: str) -> torch.Tensor | None:
        if name not in self._vectors:
            v = self.w.vector(name)
            self._vectors[name] = None if v is None else torch.from_numpy(v).to(self._home(name))
        return self._vectors[name]

    def embed_rows(self, tokens: np.ndarray) -> np.ndarray:
        """Only the batch's rows of the embedding move: it stays in host memory, as the plan assumed."""
        return self.w.matrix("token_embd.weight").rows(tokens)

    def embed(self, tokens: np.ndarray) -> torch.Tensor:
        if self.static is not None:
            return self.static.x
        return torch.from_numpy(self.embed_rows(tokens)).to(self.layer_device[0])

    def linears(self, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
        """Several matrices over one input (q, k and v): one launch where they were uploaded stacked."""
        if tuple(names) not in self._stacked:
            return [self.linear(n, x) for n in names]
        y = self.linear(self._stacked[tuple(names)], x)
        return list(y.split([self._blocks[f"{n}.weight"][1].n_rows for n in names], dim=-1))

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        blocks, q = self._upload(f"{name}.weight")
        x = x.to(blocks.device)  # activations move to the weights' GPU, never the reverse (no-op on one GPU)
        with on(blocks.device):
            if blocks.dtype == torch.float32:  # a small float matrix (the router): one cuBLAS call, exact float32
                y = x.float() @ blocks.T
            elif len(x) <= GEMV_MAX_ROWS:
                y = gemv(x, blocks, self._zeros[blocks.device][: len(x)], q.qtype, q.n_rows, q.n_cols,
                         xq=carried_q8_1(x))
            else:
                y = matmul(x.contiguous(), blocks, q.qtype, q.n_rows, q.n_cols)
        bias = self.vector(f"{name}.bias")
        return y if bias is None else y + bias

    def new_cache(self, ctx: int) -> KVCache:
        """f16 keys and values, one tensor per layer on the layer's GPU."""
        c = self.cfg
        return KVCache([torch.zeros((ctx, c.n_head_kv, c.head_dim_k), dtype=torch.float16, device=d) for d in self.layer_device],
                       [torch.zeros((ctx, c.n_head_kv, c.head_dim_v), dtype=torch.float16, device=d) for d in self.layer_device])

    def attend(self, layer: int, cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """As layers.attention, with the same f16 roundings of q and of the softmax (llama.cpp's f16 cache).
        A single token takes gpu_decode_ops' kernels (rope, the cache write and attention in two or three
        launches), captured or not, so a captured step and an eager one compute alike. In a captured decode step
        (self.static) the position is on the device: the step attends over the first n_keys cache entries, later
        ones masked, so one graph serves every position below n_keys."""
        with on(q.device):
            return self._attend(layer, cache, q, k, v)

    def _attend(self, layer: int, cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c, st = self.cfg, self.static
        if st is None and len(q) > 1:
            start = cache.length
            cos, sin = self._angles(start, len(q), q.device)
            keys, values = cache.store(layer, start, rope(k, cos, sin, c.rope), v)
            positions = torch.arange(start, start + len(q), device=q.device)
            return self._causal(rope(q, cos, sin, c.rope), keys, values, positions)
        if st is None:  # one token, not captured: the captured step's kernels, its position uploaded now
            cos, sin = self._angles(cache.length, 1, q.device)
            pos = torch.full((1,), cache.length, dtype=torch.int64, device=q.device)
            n_keys = cache.length + 1
        else:
            cos, sin, pos, n_keys = st.cos, st.sin, st.pos, st.n_keys
        return gpu_decode_ops.decode_attention(q, k, v, cos, sin, c.rope is RopeStyle.NEOX, cache.k[layer],
                                               cache.v[layer], pos, n_keys, 1.0 / float(np.sqrt(c.head_dim_k)))

    def _causal(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """q (T, H, d) at positions qpos (T,) over cached keys (L, Hkv, d) and values (L, Hkv, dv), f16."""
        T, H, d = q.shape
        L, Hkv, dv = values.shape
        group = H // Hkv
        qg = q.half().float().reshape(T, Hkv, group, d).permute(1, 2, 0, 3).reshape(Hkv, group * T, d)
        scores = qg @ keys.float().permute(1, 2, 0) / float(np.sqrt(self.cfg.head_dim_k))  # (Hkv, group*T, L)
        future = torch.arange(L, device=q.device)[None, :] > qpos.repeat(group)[:, None]
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out = probs.half().float() @ values.float().permute(1, 0, 2)  # (Hkv, group*T, dv)
        return out.reshape(Hkv, group, T, dv).permute(2, 0, 1, 3).reshape(T, H * dv)

    def _angles(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rope angles on a GPU, uploaded once for all its layers."""
        if self._rope_step != (start, n):
            self._rope_step, self._rope = (start, n), {}
        if device not in self._rope:
            c = self.cfg
            self._rope[device] = tuple(torch.from_numpy(a).to(device)
                                       for a in rope_angles(start, n, c.n_rot, c.rope_freq_base, c.rope_freq_scale))
        return self._rope[device]

    def route(self, router: str, h: torch.Tensor, bias: torch.Tensor | None) -> Routing:
        """The router's logits and the top-k. With device_routing on the device, in one launch (router_topk) where
        the router was uploaded as float32; else read back to the host for the one route()."""
        c = self.cfg
        if not self.device_routing:
            host_bias = None if bias is None else self.to_host(bias)
            logits = self.to_host(self.linear(router, h))
            return route(logits, c.n_expert_used, c.gating, c.weights_norm, c.weights_scale, host_bias)
        blocks, _ = self._upload(f"{router}.weight")
        with on(blocks.device):
            if blocks.dtype == torch.float32:
                return router_topk(h.to(blocks.device), blocks, self.vector(f"{router}.bias"), bias, c.n_expert_used,
                                   c.gating, c.weights_norm, c.weights_scale)
            return route_topk(self.linear(router, h), bias, c.n_expert_used, c.gating, c.weights_norm, c.weights_scale)
