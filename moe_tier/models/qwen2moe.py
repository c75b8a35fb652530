"""Qwen2-MoE: q/k/v biases (picked up by `linear`), and a shared expert scaled by sigmoid(ffn_gate_inp_shexp h).

x += moe(h) + sigmoid(gate_shexp h) * shared_expert(h),  h = rms(x); routed weights not renormalised.
"""

import numpy as np

from moe_tier.models.base import MoEDecoder


class Qwen2MoE(MoEDecoder):
    def ffn(self, il, h, observer):
        gate = self.w.matrix(f"blk.{il}.ffn_gate_inp_shexp.weight") @ h  # (N, 1)
        return super().ffn(il, h, observer) + self.shared_expert(il, h) / (1.0 + np.exp(-gate))
