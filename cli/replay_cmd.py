"""`moe-tier replay TRACE --model MODEL --vram ..`: cache policies over recorded routing, with the cost model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np
from rich.console import Console
from rich.table import Table

from cli.options import add_budget_options, budget_from_args
from moe_tier.errors import MoeTierError
from moe_tier.machine import probe
from moe_tier.plan import plan_tiers
from moe_tier.reader import Category, ExpertId, open_model
from moe_tier.tiers.links import balanced_share
from moe_tier.units import format_bytes, parse_bytes
from router_predict import trace as tr
from router_predict.replay import OBJECTIVES, CacheConfig, CostModel, compare, holdout

RATES = {"h2d": "pinned host -> GPU copy rate per GPU, e.g. 51GiB",
         "cpu_read": "rate the CPU streams expert weights through its matmuls, e.g. 55GiB",
         "disk": "cold-tier read rate, e.g. 1.6GB",
         "gpu_read": "rate the GPU reads weights while computing, e.g. 2TB"}


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="replay traces through LRU/LFU/LFRU/pinning/planner/Belady with the cost model")
    p.add_argument("traces", nargs="+", help="traces to score (merged)")
    p.add_argument("--model", required=True, help="the GGUF the traces were recorded on (expert sizes, fingerprint)")
    p.add_argument("--fit", nargs="+", help="traces to fit on (default: the first half of the sequences)")
    add_budget_options(p)
    p.add_argument("--gpus", type=int, help="GPUs to plan for when --vram gives one budget (default: measured or 1)")
    for name, text in RATES.items():
        p.add_argument(f"--{name.replace('_', '-')}", required=True, metavar="BYTES_PER_S", help=text + " (per second)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="hit-rate",
                   help="what the planner's settings are tuned for on the fitting traces (then the other breaks ties)")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")


def run(args: argparse.Namespace) -> int:
    desc = open_model(args.model)
    test = tr.merge([tr.load(p) for p in args.traces])
    fit, test = (tr.merge([tr.load(p) for p in args.fit]), test) if args.fit else holdout(test)
    for t in (fit, test):
        tr.check_model(t, desc.fingerprint, args.model)
    try:
        rates = {name: float(parse_bytes(getattr(args, name))) for name in RATES}
    except ValueError as err:
        raise MoeTierError(None, str(err)) from None
    if args.gpus and args.vram and "," not in args.vram:
        args.vram = ",".join([args.vram] * args.gpus)
    budget, _ = budget_from_args(args, desc)
    plan = plan_tiers(desc, probe(), budget)
    if not plan.gpus:
        raise MoeTierError(None, "no GPU here: give --vram to plan for one")
    n_gpu = len(plan.gpus)
    expert_bytes = np.array([desc.experts[ExpertId(int(layer), e)].n_bytes for layer in test.moe_layers
                             for e in range(test.n_expert)], np.int64)
    slots = min(min(g.n_slots for g in plan.gpus), -(-expert_bytes.size // n_gpu))  # more would stay empty
    dense = sum(t.n_bytes for t in desc.tensors.values() if t.category is not Category.ROUTED and t.layer is not None)
    # a miss not cached is staged as decode stages it: the CPU computes the share that finishes with the link
    cost = CostModel(rates["h2d"], rates["cpu_read"], rates["disk"], rates["gpu_read"], dense // desc.config.n_layer,
                     stage_cpu_share=balanced_share(rates["cpu_read"], rates["h2d"]))
    cache = CacheConfig(n_gpu, slots, plan.ram_budget_bytes)
    results = compare(fit, test, cost, cache, expert_bytes, args.objective)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return 0
    belady = results[-1].hit_rate
    table = Table("policy", "hit rate", "of Belady", "moved / token", "staged", "on CPU", "est. tokens/s",
                  title=f"{desc.path.name}: {n_gpu} GPU x {slots} slots for {expert_bytes.size} experts; fitted on "
                        f"{fit.n_tokens} tokens, scored on {test.n_tokens} held-out tokens; the planner tuned for "
                        f"{args.objective}")
    for r in results:
        table.add_row(r.policy, f"{r.hit_rate:.3f}", f"{r.hit_rate / belady:.0%}" if belady else "-",
                      format_bytes(r.h2d_bytes_per_token), f"{r.staged_share:.0%}", f"{r.cpu_share:.0%}",
                      f"{r.tokens_per_s:.1f}")
    Console().print(table)
    return 0
