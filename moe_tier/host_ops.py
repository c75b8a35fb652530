"""The CPU backend of the decoder: numpy arrays, numba kernels on GGUF blocks, experts from the host tiers.

A backend is the small interface the model code is written against (see models/base.py): it owns where
weights live and how each operation runs, so one decoder serves the CPU and the GPU (gpu_ops.py).
"""

from __future__ import annotations

import numpy as np

from moe_tier.config import ModelConfig
from moe_tier.kernels.activations import Activations
from moe_tier.layers import KVCache, attention, rms_norm, rope, rope_angles, silu
from moe_tier.moe import ExpertSource, Routing, moe_ffn, route
from moe_tier.tensors import Weights


class HostOps:
    def __init__(self, cfg: ModelConfig, weights: Weights, experts: ExpertSource):
        self.cfg, self.w, self.experts = cfg, weights, experts
        self.head = "output" if "output.weight" in weights else "token_embd"  # tied embeddings
        self._last: tuple[np.ndarray, Activations] | None = None

    rms_norm = staticmethod(rms_norm)

    @staticmethod
    def add_rms_norm(x: np.ndarray, r: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        s = x + r
        return s, rms_norm(s, weight, eps)

    silu = staticmethod(silu)

    @staticmethod
    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    @staticmethod
    def empty_like(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, dtype=np.float32)

    @staticmethod
    def to_host(x: np.ndarray) -> np.ndarray:
        return x

    def vector(self, name: str) -> np.ndarray | None:
        return self.w.vector(name)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.w.matrix("token_embd.weight").rows(tokens)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """W x (+ b) for the GGUF tensor `name`.weight (and `name`.bias where the file has one)."""
        y = self.w.matrix(f"{name}.weight") @ self._activations(x)
        bias = self.w.vector(f"{name}.bias")
        return y if bias is None else y + bias

    def linears(self, names: list[str], x: np.ndarray) -> list[np.ndarray]:
        return [self.linear(n, x) for n in names]  # x is quantized once (_activations)

    def _activations(self, x: np.ndarray) -> Activations:
        """x with its quantizations, kept for the next call: the decoder passes the same normalised h to q, k and v,
        which then quantize it once. Keyed by identity (the cached object holds x, so its id is not reused); the
        decoder never writes into an array it has passed on."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, Activations(x))
        return self._last[1]

    def new_cache(self, ctx: int) -> KVCache:
        c = self.cfg
        return KVCache.host(c.n_layer, ctx, c.n_head_kv, c.head_dim_k, c.head_dim_v)

    def attend(self, layer: int, cache: KVCache, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Rope q (T, H, d) and k (T, Hkv, d) at the cache's next positions, store k and v, attend causally."""
        c, start = self.cfg, cache.length
        cos, sin = rope_angles(start, len(q), c.n_rot, c.rope_freq_base, c.rope_freq_scale)
        keys, values = cache.store(layer, start, rope(k, cos, sin, c.rope), v)
        return attention(rope(q, cos, sin, c.rope), keys, values, start, 1.0 / np.sqrt(c.head_dim_k))

    def route(self, router: str, h: np.ndarray, bias: np.ndarray | None) -> Routing:
        c = self.cfg
        return route(self.linear(router, h), c.n_expert_used, c.gating, c.weights_norm, c.weights_scale, bias)

    def moe(self, x: np.ndarray, routing: Routing, layer: int) -> np.ndarray:
        return moe_ffn(x, routing, layer, self.experts)
