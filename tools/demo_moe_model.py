"""The demo MoE in PyTorch, computing exactly what llama.cpp's `qwen3moe` graph computes (issue 6).

llama.cpp reference: src/models/qwen3moe.cpp and build_moe_ffn in src/llama-graph.cpp. Per layer:
  x += attn_output(attention(rope_neox(q_norm(attn_q(n))), rope_neox(k_norm(attn_k(n))), attn_v(n))),
       n = rms(x) * attn_norm; GQA head h reads kv head h // (H / K); scale 1/sqrt(Dh)
  x += sum over the top-2 experts e of w_e * ffn_down_e(silu(ffn_gate_e(m)) * ffn_up_e(m)),
       m = rms(x) * ffn_norm, p = softmax(ffn_gate_inp(m)), w = p[top2] / sum(p[top2])
then logits = output(rms(x) * output_norm). Attribute names are the GGUF tensor names, so export needs no
mapping table: `blocks.3.ffn_up_exps.weight` is written as `blk.3.ffn_up_exps.weight`.

Shape key: B batch, T tokens, N = B*T, D model width, H query heads, K kv heads, Dh head width,
E experts, A experts used per token, F expert hidden width, V vocabulary.

Requirements: torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    d_model: int = 384
    n_head: int = 6
    n_kv_head: int = 2
    head_dim: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_expert: int = 256
    context_length: int = 512
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self):
        assert self.n_head % self.n_kv_head == 0 and self.head_dim % 2 == 0
        assert 0 < self.n_expert_used <= self.n_expert

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


def rope_neox(x, cos, sin):
    """x [B, T, H, Dh]; NEOX pairs element i with i + Dh/2 (llama.cpp LLAMA_ROPE_TYPE_NEOX)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def route(router_logits, n_used: int):
    """Softmax gating, top-A, weights renormalised over the chosen (llama.cpp's norm_w; sum clamped like it)."""
    probs = torch.softmax(router_logits.float(), dim=-1)                        # [N, E]
    top_p, top_i = probs.topk(n_used, dim=-1)                                   # [N, A]
    top_w = top_p / top_p.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    return probs, top_i, top_w


class Block(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.attn_q = linear(c.d_model, c.n_head * c.head_dim)
        self.attn_k = linear(c.d_model, c.n_kv_head * c.head_dim)
        self.attn_v = linear(c.d_model, c.n_kv_head * c.head_dim)
        self.attn_q_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.attn_k_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.attn_output = linear(c.n_head * c.head_dim, c.d_model)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.ffn_gate_inp = linear(c.d_model, c.n_expert)
        # GGUF layout: gate/up [E, F, D], down [E, D, F] (numpy order; ggml ne is reversed)
        self.ffn_gate_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff_expert, c.d_model))
        self.ffn_up_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff_expert, c.d_model))
        self.ffn_down_exps = nn.Parameter(torch.empty(c.n_expert, c.d_model, c.n_ff_expert))

    def attention(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        n = self.attn_norm(x)
        q = self.attn_q_norm(self.attn_q(n).view(B, T, c.n_head, c.head_dim))
        k = self.attn_k_norm(self.attn_k(n).view(B, T, c.n_kv_head, c.head_dim))
        v = self.attn_v(n).view(B, T, c.n_kv_head, c.head_dim)
        q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)
        group = c.n_head // c.n_kv_head                                          # head h -> kv head h // group
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.attn_output(out.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))

    def moe(self, x):
        """Dense over experts (every expert runs, unchosen ones weigh 0): same function and gradients as a
        sparse dispatch, static shapes, and cheap at this size. Returns output and (probs, top_i) for the aux loss."""
        B, T, D = x.shape
        m = self.ffn_norm(x).reshape(B * T, D)                                  # [N, D]
        probs, top_i, top_w = route(self.ffn_gate_inp(m), self.c.n_expert_used)
        dense_w = torch.zeros_like(probs).scatter(1, top_i, top_w)              # [N, E]
        gate = torch.einsum("nd,efd->enf", m, self.ffn_gate_exps.to(m.dtype))
        up = torch.einsum("nd,efd->enf", m, self.ffn_up_exps.to(m.dtype))
        down = torch.einsum("enf,edf->end", F.silu(gate) * up, self.ffn_down_exps.to(m.dtype))  # [E, N, D]
        out = torch.einsum("ne,end->nd", dense_w.to(down.dtype), down)
        return out.view(B, T, D), probs, top_i

    def forward(self, x, cos, sin):
        x = x + self.attention(x, cos, sin)
        y, probs, top_i = self.moe(x)
        return x + y, probs, top_i


class DemoMoE(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.token_embd = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = RMSNorm(c.d_model, c.rms_eps)
        self.output = linear(c.d_model, c.vocab_size)
        inv_freq = c.rope_freq_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn_output.weight", "ffn_down_exps")):
                nn.init.normal_(p, std=std / (2 * self.c.n_layer) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, ids):
        """ids [B, T] -> logits [B, T, V] (float32), aux load-balancing loss, per-layer top_i [N, A]."""
        T = ids.shape[1]
        angles = torch.outer(torch.arange(T, device=ids.device, dtype=torch.float32), self.inv_freq)  # [T, Dh/2]
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x = self.token_embd(ids)
        aux = x.new_zeros((), dtype=torch.float32)
        chosen = []
        for block in self.blocks:
            x, probs, top_i = block(x, cos, sin)
            # Switch-style balance: E * sum_e (fraction of routed slots to e) * (mean probability of e)
            frac = torch.zeros_like(probs).scatter(1, top_i, 1.0).mean(0) / self.c.n_expert_used
            aux = aux + self.c.n_expert * (frac * probs.mean(0)).sum()
            chosen.append(top_i)
        logits = self.output(self.output_norm(x)).float()
        return logits, aux / self.c.n_layer, chosen
