"""Next-token choice: greedy, or temperature with top-k and top-p, reproducible from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: {self}")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (V,) -> token id."""
        cfg = self.cfg
        if cfg.temperature == 0.0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if cfg.top_k:
            order = order[: cfg.top_k]
        z = logits[order].astype(np.float64) / cfg.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
