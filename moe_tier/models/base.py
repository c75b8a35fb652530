"""The pre-norm MoE decoder every supported family shares; families override the parts that differ.

Shape key: N tokens of the whole batch (all sequences' new tokens, concatenated), T tokens of one
sequence, D embedding width, H / Hkv heads, d head dim, V vocabulary.
Every matmul sees all N tokens at once, so each weight is read once per step for the whole batch;
only attention runs per sequence, against that sequence's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moe_tier.config import ModelConfig
from moe_tier.layers import KVCache, attention, rms_norm, rope, rope_angles
from moe_tier.moe import ExpertSource, Routing, moe_ffn, route, swiglu_ffn
from moe_tier.tensors import Weights


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence in the batch: x[row:row+length] continue `cache` at its end."""

    cache: KVCache
    row: int
    length: int


class RoutingObserver(Protocol):
    def record(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None: ...


class MoEDecoder:
    """Mixtral-style decoder: x += attn(norm(x)); x += moe(norm(x)). Subclasses adjust q/k and the FFN."""

    def __init__(self, cfg: ModelConfig, weights: Weights, experts: ExpertSource):
        self.cfg, self.w, self.experts = cfg, weights, experts
        self.output = weights.get("output.weight") or weights.matrix("token_embd.weight")  # tied head

    def new_cache(self, ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, ctx, c.n_head_kv, c.head_dim_k, c.head_dim_v)

    def forward(self, tokens: np.ndarray, segments: list[Segment], observer: RoutingObserver | None = None,
                last_only: bool = False) -> np.ndarray:
        """tokens (N,) -> logits (N, V), or (len(segments), V) for each sequence's last token."""
        c = self.cfg
        x = self.w.matrix("token_embd.weight").rows(tokens)  # (N, D)
        for il in range(c.n_layer):
            h = rms_norm(x, self.w.vector(f"blk.{il}.attn_norm.weight"), c.norm_eps)
            x = x + self.attention(il, h, segments)
            h = rms_norm(x, self.w.vector(f"blk.{il}.ffn_norm.weight"), c.norm_eps)
            x = x + self.ffn(il, h, observer)
        for s in segments:
            s.cache.length += s.length
        if last_only:
            x = x[[s.row + s.length - 1 for s in segments]]
        x = rms_norm(x, self.w.vector("output_norm.weight"), c.norm_eps)
        return self.output @ x

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        y = self.w.matrix(f"{name}.weight") @ x
        bias = self.w.vector(f"{name}.bias")
        return y if bias is None else y + bias

    def qk_norm(self, il: int, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q (N, H*d), k (N, Hkv*d) before the split into heads; Mixtral has no q/k norm."""
        return q, k

    def attention(self, il: int, h: np.ndarray, segments: list[Segment]) -> np.ndarray:
        c = self.cfg
        p = f"blk.{il}"
        q, k = self.qk_norm(il, self.linear(f"{p}.attn_q", h), self.linear(f"{p}.attn_k", h))
        v = self.linear(f"{p}.attn_v", h)
        q = q.reshape(len(h), c.n_head, c.head_dim_k)
        k = k.reshape(len(h), c.n_head_kv, c.head_dim_k)
        v = v.reshape(len(h), c.n_head_kv, c.head_dim_v)
        out = np.empty((len(h), c.n_head * c.head_dim_v), dtype=np.float32)
        for s in segments:
            rows = slice(s.row, s.row + s.length)
            start = s.cache.length
            cos, sin = rope_angles(np.arange(start, start + s.length), c.n_rot, c.rope_freq_base, c.rope_freq_scale)
            keys, values = s.cache.store(il, start, rope(k[rows], cos, sin, c.rope), v[rows])
            out[rows] = attention(rope(q[rows], cos, sin, c.rope), keys, values, start, 1.0 / np.sqrt(c.head_dim_k))
        return self.linear(f"{p}.attn_output", out)

    def route(self, il: int, h: np.ndarray) -> Routing:
        c = self.cfg
        logits = self.linear(f"blk.{il}.ffn_gate_inp", h)
        bias = self.w.vector(f"blk.{il}.exp_probs_b.bias")
        return route(logits, c.n_expert_used, c.gating, c.weights_norm, c.weights_scale, bias)

    def ffn(self, il: int, h: np.ndarray, observer: RoutingObserver | None) -> np.ndarray:
        routing = self.route(il, h)
        if observer is not None:
            observer.record(il, routing.ids, routing.weights)
        return moe_ffn(h, routing, il, self.experts)

    def shared_expert(self, il: int, h: np.ndarray) -> np.ndarray:
        p = f"blk.{il}"
        return swiglu_ffn(h, self.w.matrix(f"{p}.ffn_gate_shexp.weight"), self.w.matrix(f"{p}.ffn_up_shexp.weight"),
                          self.w.matrix(f"{p}.ffn_down_shexp.weight"))
