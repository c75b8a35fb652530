"""OLMoE: RMSNorm over the whole query and key projections (all heads together), NEOX rope, no renormalisation."""

import numpy as np

from moe_tier.layers import rms_norm
from moe_tier.models.base import MoEDecoder


class OLMoE(MoEDecoder):
    def qk_norm(self, il: int, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        eps = self.cfg.norm_eps
        return (rms_norm(q, self.w.vector(f"blk.{il}.attn_q_norm.weight"), eps),
                rms_norm(k, self.w.vector(f"blk.{il}.attn_k_norm.weight"), eps))
