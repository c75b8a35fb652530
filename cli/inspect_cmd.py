"""`moe-tier inspect MODEL`: architecture, bytes by category, per-expert sizes and the tier plan."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from cli.options import add_budget_options, budget_from_args, default_model
from moe_tier.fits import FitStore
from moe_tier.machine import probe
from moe_tier.plan import TierPlan, plan_tiers
from moe_tier.reader import ModelDesc, open_model
from moe_tier.units import format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a GGUF MoE model and plan its tiers")
    p.add_argument("model", nargs="?", help="GGUF file (default: the embedded demo model)")
    add_budget_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (stable keys)")


def run(args: argparse.Namespace) -> int:
    desc = open_model(args.model or default_model())
    budget, freq = budget_from_args(args, desc)
    plan = plan_tiers(desc, probe(), budget, expert_freq=freq, fits=FitStore())
    if args.json:
        print(json.dumps(report(desc, plan)))
    else:
        render(desc, plan, Console())
    return 0


def report(desc: ModelDesc, plan: TierPlan) -> dict:
    """The stable JSON shape that tools and tests build on."""
    c = desc.config
    config = {k: (v.name.lower() if hasattr(v, "name") else v) for k, v in asdict(c).items()}
    return {
        "file": str(desc.path),
        "fingerprint": desc.fingerprint,
        "arch": c.arch,
        "n_layer": c.n_layer,
        "n_expert": c.n_expert,
        "n_expert_used": c.n_expert_used,
        "config": config,
        "bytes": desc.bytes_by_category(),
        "experts": [
            {"layer": e.id.layer, "expert": e.id.expert, "bytes": e.n_bytes,
             "qtypes": sorted({p.qtype.name for p in e.parts})}
            for e in desc.experts.values()
        ],
        "plan": {
            "hot": [list(e) for e in plan.hot],
            "warm": [list(e) for e in plan.warm],
            "cold": [list(e) for e in plan.cold],
            "hot_gpu": [plan.hot[e] for e in plan.hot],
            "pinned_hot": [list(e) for e in plan.pinned_hot],
            "ctx": plan.ctx,
            "ranked_by": plan.ranked_by,
            "ram_budget_bytes": plan.ram_budget_bytes,
            "gpus": [asdict(g) for g in plan.gpus],
            "notes": list(plan.notes),
        },
    }


def render(desc: ModelDesc, plan: TierPlan, console: Console) -> None:
    c = desc.config
    console.print(f"[bold]{desc.path.name}[/]  {c.arch}  {format_bytes(desc.file_bytes)}  fingerprint {desc.fingerprint}")

    hp = Table(title="Hyper-parameters", show_header=False, box=None, padding=(0, 2))
    rows = [
        ("layers", c.n_layer), ("embedding", c.n_embd), ("vocab", c.n_vocab), ("context (trained)", c.n_ctx_train),
        ("heads / kv heads", f"{c.n_head} / {c.n_head_kv}"), ("head dim k / v", f"{c.head_dim_k} / {c.head_dim_v}"),
        ("rope", f"{c.rope.value}, {c.n_rot} dims, base {c.rope_freq_base:g}, scale {c.rope_freq_scale:g}"),
        ("norm eps", f"{c.norm_eps:g}"),
        ("experts / used", f"{c.n_expert} / {c.n_expert_used}"), ("expert FFN", c.n_ff_exp),
        ("shared experts", f"{c.n_expert_shared or (1 if c.n_ff_shexp else 0)} x {c.n_ff_shexp}"),
        ("leading dense layers", f"{c.n_leading_dense} (FFN {c.n_ff})" if c.n_leading_dense else "0"),
        ("gating", f"{c.gating.name.lower()}, weights {'renormalised' if c.weights_norm else 'as gated'}, "
                   f"scale {c.weights_scale:g}"),
    ] + [(k.replace("_", " "), v) for k, v in c.extra.items()]
    for k, v in rows:
        hp.add_row(k, str(v))
    console.print(hp)

    cats = Table(title="Bytes by category")
    cats.add_column("category"), cats.add_column("bytes", justify="right"), cats.add_column("share", justify="right")
    by_cat = desc.bytes_by_category()
    total = sum(by_cat.values())
    for k, v in by_cat.items():
        cats.add_row(k, format_bytes(v), f"{100 * v / total:.1f}%")
    cats.add_row("[bold]total", f"[bold]{format_bytes(total)}", "")
    console.print(cats)

    sizes = Counter(e.n_bytes for e in desc.experts.values())
    qtypes = Counter("+".join(sorted({p.qtype.name for p in e.parts})) for e in desc.experts.values())
    console.print(
        f"routed experts: {len(desc.experts)} in {len(desc.moe_layers)} layers; bytes per expert: "
        + ", ".join(f"{format_bytes(s)} x{n}" for s, n in sizes.items())
        + "; quant types: " + ", ".join(f"{q} x{n}" for q, n in qtypes.items())
    )
    render_plan(desc, plan, console)


def render_plan(desc: ModelDesc, plan: TierPlan, console: Console) -> None:
    t = Table(title=f"Tier plan (ctx {plan.ctx}, experts ranked {plan.ranked_by})")
    for col in ("GPU", "budget", "runtime", "dense", "KV cache", "scratch", "layers", "expert slots"):
        t.add_column(col, justify="right")
    for g in plan.gpus:
        runtime = format_bytes(g.runtime_bytes) + ("" if g.runtime_measured else " (guess)")
        layers = f"{g.layers[0]}-{g.layers[-1]}" if g.layers else "-"
        t.add_row(f"{g.index} {g.name}", format_bytes(g.budget_bytes), runtime, format_bytes(g.dense_bytes),
                  format_bytes(g.kv_bytes), format_bytes(g.scratch_bytes), layers,
                  f"{g.n_slots} x {format_bytes(g.slot_bytes)}")
    if plan.gpus:
        console.print(t)
    else:
        console.print("no GPU present and no --vram given: planning for the CPU alone")
    size = {e: r.n_bytes for e, r in desc.experts.items()}
    tiers = Table(title="Routed experts by tier")
    for col in ("tier", "experts", "bytes", "where"):
        tiers.add_column(col, justify="right" if col != "where" else "left")
    also = f" ({len(plan.pinned_hot)} also pinned in RAM)" if plan.pinned_hot else ""
    tiers.add_row("hot", str(len(plan.hot)), format_bytes(sum(size[e] for e in plan.hot)), "GPU slots" + also)
    tiers.add_row("warm", str(len(plan.warm)), format_bytes(sum(size[e] for e in plan.warm)),
                  f"pinned RAM (budget {format_bytes(plan.ram_budget_bytes)})")
    tiers.add_row("cold", str(len(plan.cold)), format_bytes(sum(size[e] for e in plan.cold)), str(desc.path))
    console.print(tiers)
    for note in plan.notes:
        console.print(f"note: {note}")
