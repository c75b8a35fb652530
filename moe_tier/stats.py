"""Counters for every tier and link, kept in one object a status view can read while the engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TierCounter:
    hits: int = 0  # expert uses served by this tier
    bytes: int = 0  # expert bytes read from it


@dataclass
class EngineStats:
    tiers: dict[str, TierCounter] = field(default_factory=dict)
    links: dict[str, TierCounter] = field(default_factory=dict)  # expert moves, e.g. "disk->gpu", "warm->gpu"
    waits: dict[str, float] = field(default_factory=dict)  # seconds the host waited, per link or read-back
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    dense_bytes_per_token: int = 0  # dense weights read once per forward step
    decode_expert_bytes: int = 0  # expert bytes read while generating (prefill shares reads across tokens)

    def served(self, tier: str, n_bytes: int) -> None:
        c = self.tiers.setdefault(tier, TierCounter())
        c.hits += 1
        c.bytes += n_bytes

    def moved(self, link: str, n_bytes: int) -> None:
        c = self.links.setdefault(link, TierCounter())
        c.hits += 1
        c.bytes += n_bytes

    def waited(self, what: str, seconds: float) -> None:
        self.waits[what] = self.waits.get(what, 0.0) + seconds

    def hit_rates(self) -> dict[str, float]:
        total = sum(c.hits for c in self.tiers.values()) or 1
        return {name: c.hits / total for name, c in self.tiers.items()}

    def expert_bytes(self) -> int:
        return sum(c.bytes for c in self.tiers.values())
