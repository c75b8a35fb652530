"""BENCHMARK ONLY: overrides of start-up decisions, to time a path the engine would not pick on this machine."""

from __future__ import annotations

from moe_tier import moe_decode
from moe_tier.tiers import links


def fix_cpu_rate(gb_per_s: float) -> None:
    """The CPU's warm-expert rate taken as given instead of measured (the cost model and the path follow it)."""
    links.measure_cpu = lambda *args, **kwargs: gb_per_s * 1e9


def read_back_always() -> None:
    """Decode reads routing back every layer wherever an expert is warm, as on a machine whose CPU runs a warm
    expert CPU_PATH_MARGIN times faster than its link; the measured rates still place each miss."""
    moe_decode.CPU_PATH_MARGIN = 0.0
