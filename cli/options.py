"""Options shared by commands that plan tiers, and the embedded default model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moe_tier.errors import MoeTierError
from moe_tier.plan import Budget
from moe_tier.units import parse_bytes, parse_bytes_list

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = DATA / "demo-moe.gguf"  # the trained demo model (data/MODEL_CARD.md)


def default_model() -> Path:
    if not DEFAULT_MODEL.exists():
        raise MoeTierError(DEFAULT_MODEL, "the embedded default model is missing; pass a GGUF file")
    return DEFAULT_MODEL


def add_budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram", help="VRAM budget per GPU, e.g. 12GiB, or one per GPU: 12GiB,24GiB (default: measured free)")
    p.add_argument("--ram", help="pinned host RAM for the warm tier, e.g. 32GiB (default: 80%% of available)")
    p.add_argument("--ctx", type=int, default=4096, help="context length to reserve KV cache for (default 4096)")
    p.add_argument("--profile", metavar="TRACE", help="routing trace of this model: hottest experts go to VRAM first")


def budget_from_args(args: argparse.Namespace, desc=None) -> tuple[Budget, np.ndarray | None]:
    """Budget from --vram/--ram/--ctx, and expert frequencies (layer, expert) from --profile."""
    try:
        vram = tuple(parse_bytes_list(args.vram)) if args.vram else None
        ram = parse_bytes(args.ram) if args.ram else None
    except ValueError as err:
        raise MoeTierError(None, str(err)) from None
    if args.ctx <= 0:
        raise MoeTierError(None, f"--ctx must be positive, got {args.ctx}")
    freq = None
    if args.profile and desc is not None:
        from router_predict import stats, trace

        t = trace.load(args.profile)
        trace.check_model(t, desc.fingerprint, desc.path)
        freq = np.zeros((desc.config.n_layer, desc.config.n_expert))
        freq[t.moe_layers] = stats.counts(t)
    return Budget(vram_bytes=vram, ram_bytes=ram, ctx=args.ctx), freq
