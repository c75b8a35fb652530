"""moe-tier: run Mixture-of-Experts GGUF models from hot (VRAM), warm (pinned RAM) and cold (NVMe) tiers."""

from moe_tier.errors import MoeTierError

__all__ = ["MoeTierError"]
