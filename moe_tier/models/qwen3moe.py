"""Qwen3-MoE: Mixtral plus RMSNorm of each query and key head (attn_q_norm, attn_k_norm over d), NEOX rope."""

import numpy as np

from moe_tier.layers import rms_norm
from moe_tier.models.base import MoEDecoder


class Qwen3MoE(MoEDecoder):
    def qk_norm(self, il: int, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, d = self.cfg, self.cfg.head_dim_k
        qn = rms_norm(q.reshape(len(q), -1, d), self.w.vector(f"blk.{il}.attn_q_norm.weight"), c.norm_eps)
        kn = rms_norm(k.reshape(len(k), -1, d), self.w.vector(f"blk.{il}.attn_k_norm.weight"), c.norm_eps)
        return qn.reshape(q.shape), kn.reshape(k.shape)
