"""The pre-norm MoE decoder every supported family shares; families override the parts that differ.

Shape key: N tokens of the whole batch (all sequences' new tokens, concatenated), T tokens of one
sequence, D embedding width, H / Hkv heads, d head dim, V vocabulary.
Every matmul sees all N tokens at once, so each weight is read once per step for the whole batch;
only attention runs per sequence, against that sequence's KV cache.
The code is written against a backend `ops` (host_ops.HostOps: numpy + numba; gpu_ops.GpuOps: torch +
Triton), which owns the weights, the KV cache and the experts; arrays here are that backend's arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moe_tier.config import ModelConfig


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence in the batch: x[row:row+length] continue `cache` at its end."""

    cache: Any  # the backend's KV cache
    row: int
    length: int


class RoutingObserver(Protocol):
    """Sees every MoE layer's routing; if it also has `hidden(layer, where, h)`, it sees the normalised
    inputs of attention ("attn_in") and of the MoE block ("ffn_in") too (gate lookahead is fitted on them)."""

    def record(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None: ...


class MoEDecoder:
    """Mixtral-style decoder: x += attn(norm(x)); x += moe(norm(x)). Subclasses adjust q/k and the FFN."""

    def __init__(self, cfg: ModelConfig, ops):
        self.cfg, self.ops = cfg, ops

    def new_cache(self, ctx: int):
        return self.ops.new_cache(ctx)

    def forward(self, tokens: np.ndarray, segments: list[Segment], observer: RoutingObserver | None = None,
                last_only: bool = False):
        """tokens (N,) -> logits (N, V), or (len(segments), V) for each sequence's last token."""
        c, ops = self.cfg, self.ops
        hidden = getattr(observer, "hidden", None)
        x = ops.embed(tokens)  # (N, D)
        h = ops.rms_norm(x, ops.vector("blk.0.attn_norm.weight"), c.norm_eps)
        for il in range(c.n_layer):  # each residual sum comes with the next block's norm (one GPU launch)
            if hidden:
                hidden(il, "attn_in", ops.to_host(h))
            x, h = ops.add_rms_norm(x, self.attention(il, h, segments), ops.vector(f"blk.{il}.ffn_norm.weight"), c.norm_eps)
            if hidden:
                hidden(il, "ffn_in", ops.to_host(h))
            after = f"blk.{il + 1}.attn_norm.weight" if il + 1 < c.n_layer else "output_norm.weight"
            x, h = ops.add_rms_norm(x, self.ffn(il, h, observer), ops.vector(after), c.norm_eps)
        for s in segments:
            s.cache.length += s.length
        if last_only and any(s.length != 1 for s in segments):  # one-token segments: h already is their last rows
            h = h[[s.row + s.length - 1 for s in segments]]
        return ops.linear(ops.head, h)

    def qk_norm(self, il: int, q, k):
        """q (N, H*d), k (N, Hkv*d) before the split into heads; Mixtral has no q/k norm."""
        return q, k

    def attention(self, il: int, h, segments: list[Segment]):
        c, ops, p = self.cfg, self.ops, f"blk.{il}"
        q, k, v = ops.linears([f"{p}.attn_q", f"{p}.attn_k", f"{p}.attn_v"], h)
        q, k = self.qk_norm(il, q, k)
        q = q.reshape(len(h), c.n_head, c.head_dim_k)
        k = k.reshape(len(h), c.n_head_kv, c.head_dim_k)
        v = v.reshape(len(h), c.n_head_kv, c.head_dim_v)
        if len(segments) == 1 and segments[0].length == len(h):  # the usual case: no copy into a shared output
            out = ops.attend(il, segments[0].cache, q, k, v)
        else:
            out = ops.empty_like(q, (len(h), c.n_head * c.head_dim_v))
            for s in segments:
                rows = slice(s.row, s.row + s.length)
                out[rows] = ops.attend(il, s.cache, q[rows], k[rows], v[rows])
        return ops.linear(f"{p}.attn_output", out)

    def ffn(self, il: int, h, observer: RoutingObserver | None):
        ops = self.ops
        routing = ops.route(f"blk.{il}.ffn_gate_inp", h, ops.vector(f"blk.{il}.exp_probs_b.bias"))
        if observer is not None:
            seen = routing.host()
            observer.record(il, seen.ids, seen.weights)
        return ops.moe(h, routing, il)

    def shared_expert(self, il: int, h):
        ops, p = self.ops, f"blk.{il}"
        return ops.linear(f"{p}.ffn_down_shexp", ops.silu(ops.linear(f"{p}.ffn_gate_shexp", h)) *
                          ops.linear(f"{p}.ffn_up_shexp", h))
