"""Synthetic GGUF MoE models for tests and benchmarks: small and exact (writer), or full-size and fast (fast)."""

from moe_tier.synth.spec import ARCHS, LAYOUTS, PRESETS, QTYPES, SynthSpec, mixtral_8x7b, preset, tiny
from moe_tier.synth.fast import write_fast
from moe_tier.synth.writer import write_model

__all__ = ["ARCHS", "LAYOUTS", "PRESETS", "QTYPES", "SynthSpec", "mixtral_8x7b", "preset", "tiny", "write_fast",
           "write_model"]
