"""Qwen3-MoE: Mixtral plus RMSNorm of each query and key head (attn_q_norm, attn_k_norm over d), NEOX rope."""

from moe_tier.models.base import MoEDecoder


class Qwen3MoE(MoEDecoder):
    def qk_norm(self, il, q, k):
        c, ops, d = self.cfg, self.ops, self.cfg.head_dim_k
        qn = ops.rms_norm(q.reshape(len(q), -1, d), ops.vector(f"blk.{il}.attn_q_norm.weight"), c.norm_eps)
        kn = ops.rms_norm(k.reshape(len(k), -1, d), ops.vector(f"blk.{il}.attn_k_norm.weight"), c.norm_eps)
        return qn.reshape(q.shape), kn.reshape(k.shape)
