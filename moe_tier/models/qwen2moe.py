"""Qwen2-MoE: q/k/v biases (picked up by `linear`), and a shared expert scaled by sigmoid(ffn_gate_inp_shexp h).

x += moe(h) + sigmoid(gate_shexp h) * shared_expert(h),  h = rms(x); routed weights not renormalised.
"""

from moe_tier.models.base import MoEDecoder


class Qwen2MoE(MoEDecoder):
    def ffn(self, il, h, observer):
        gate = self.ops.sigmoid(self.ops.linear(f"blk.{il}.ffn_gate_inp_shexp", h))  # (N, 1)
        return super().ffn(il, h, observer) + self.shared_expert(il, h) * gate
