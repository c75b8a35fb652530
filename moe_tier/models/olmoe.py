"""OLMoE: RMSNorm over the whole query and key projections (all heads together), NEOX rope, no renormalisation."""

from moe_tier.models.base import MoEDecoder


class OLMoE(MoEDecoder):
    def qk_norm(self, il, q, k):
        ops, eps = self.ops, self.cfg.norm_eps
        return (ops.rms_norm(q, ops.vector(f"blk.{il}.attn_q_norm.weight"), eps),
                ops.rms_norm(k, ops.vector(f"blk.{il}.attn_k_norm.weight"), eps))
