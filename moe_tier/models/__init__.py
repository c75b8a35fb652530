"""One model family per file, looked up by GGUF `general.architecture`."""

from __future__ import annotations

from moe_tier.errors import MoeTierError
from moe_tier.models.base import MoEDecoder, Segment
from moe_tier.models.llama import Mixtral
from moe_tier.models.olmoe import OLMoE
from moe_tier.models.qwen2moe import Qwen2MoE
from moe_tier.models.qwen3moe import Qwen3MoE

FAMILIES: dict[str, type[MoEDecoder]] = {
    "llama": Mixtral,
    "qwen2moe": Qwen2MoE,
    "qwen3moe": Qwen3MoE,
    "olmoe": OLMoE,
}


def family(arch: str, path) -> type[MoEDecoder]:
    if arch not in FAMILIES:
        raise MoeTierError(path, f"architecture {arch!r} is not supported by the engine yet "
                                 f"(inspect and plan work; engine runs: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


__all__ = ["FAMILIES", "MoEDecoder", "Segment", "family"]
