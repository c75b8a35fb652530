"""`moe-tier run [MODEL] -p PROMPT -n N`: stream generated text to stdout, a summary to stderr."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from cli.options import add_budget_options, budget_from_args, default_model
from moe_tier.engine import Engine
from moe_tier.errors import MoeTierError
from moe_tier.reader import open_model
from moe_tier.sampling import SamplingConfig
from moe_tier.tiers.slots import POLICY_NAMES
from moe_tier.units import format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt")
    p.add_argument("model", nargs="?", help="GGUF file (default: the embedded demo model)")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the GGUF's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", choices=POLICY_NAMES, default="planner",
                   help="which hot expert a miss replaces on the GPU; planner: the live planner, which also "
                        "prefetches (default)")
    add_budget_options(p)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise MoeTierError(None, f"-n must be >= 0, got {args.max_tokens}")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as err:
        raise MoeTierError(None, str(err)) from None
    path = args.model or default_model()
    budget, freq = budget_from_args(args, open_model(path) if args.profile else None)
    eng = Engine.open(path, vram=budget.vram_bytes, ram=budget.ram_bytes, ctx=budget.ctx, expert_freq=freq,
                      policy=args.policy)
    out = sys.stdout
    out.write(args.prompt if not args.chat else "")
    for piece in eng.stream(args.prompt, args.max_tokens, sampling, chat=args.chat):
        out.write(piece)
        out.flush()
    out.write("\n")
    summary(eng, Console(stderr=True))
    return 0


def summary(eng: Engine, console: Console) -> None:
    s = eng.stats
    prompt_tps = s.prompt_tokens / s.prompt_seconds if s.prompt_seconds else 0.0
    gen_tps = s.generated_tokens / s.generate_seconds if s.generate_seconds else 0.0
    expert_per_token = s.decode_expert_bytes / max(s.generated_tokens, 1)
    rates = ", ".join(f"{tier} {100 * r:.0f}%" for tier, r in sorted(s.hit_rates().items())) or "-"
    console.print(
        f"[dim]{eng.desc.path.name}: prompt {s.prompt_tokens} tok at {prompt_tps:.1f} tok/s, "
        f"generated {s.generated_tokens} tok at {gen_tps:.1f} tok/s; weights read per token: "
        f"dense {format_bytes(s.dense_bytes_per_token)} + experts {format_bytes(expert_per_token)}; "
        f"expert tiers: {rates}[/]"
    )
    tiers = getattr(eng, "tiers", None)  # the GPU engine: measured links and what crossed them
    if tiers is not None:
        sp = tiers.speeds
        moved = ", ".join(f"{link} {format_bytes(c.bytes / max(s.generated_tokens + s.prompt_tokens, 1))}"
                          for link, c in s.links.items()) or "nothing"
        console.print(f"[dim]links measured: host->GPU {sp.h2d_bytes_per_s / 1e9:.1f} GB/s, disk "
                      f"{sp.disk_bytes_per_s / 1e9:.2f} GB/s, CPU experts {sp.cpu_bytes_per_s / 1e9:.1f} GB/s"
                      + (f", host RAM to both at once {sp.host_bytes_per_s / 1e9:.1f} GB/s" if sp.host_bytes_per_s else "")
                      + f"; moved per token: {moved}[/]")
        console.print(f"[dim]decode: {eng.decode_mode}[/]")
        if s.waits:
            waits = ", ".join(f"{what} {seconds * 1e3:.0f} ms" for what, seconds in s.waits.items())
            console.print(f"[dim]host waited on: {waits}[/]")
