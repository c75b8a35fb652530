"""moe-tier: run Mixture-of-Experts GGUF models from hot (VRAM), warm (pinned RAM) and cold (NVMe) tiers."""

from moe_tier.errors import MoeTierError


def __getattr__(name):
    # Engine pulls in numba kernels and llama.cpp's tokenizer: import it only when asked for.
    if name == "Engine":
        from moe_tier.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "MoeTierError"]
