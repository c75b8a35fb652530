"""Mixtral (GGUF arch `llama` with experts): the base decoder as is.

x += attn_output(attn(rope_norm(attn_q h), rope_norm(attn_k h), attn_v h)),  h = rms(x)
x += sum_k w_k * expert_k(rms(x)),  w = top-k of softmax(ffn_gate_inp h), renormalised
Both expert layouts (merged ffn_*_exps and per-expert ffn_*.E) reach here as the same ExpertWeights.
"""

from moe_tier.models.base import MoEDecoder


class Mixtral(MoEDecoder):
    pass
