"""Where a decode step's GPU time goes: the kernels of one captured step, by name, per token.

A Mixtral-8x7B-shaped Q4_K file with few layers (every layer is alike), decoded as CUDA graph replays;
torch.profiler lists the kernels of a few steps. Per kernel name: launches and microseconds per token and per
layer, beside the step's wall time. The default budget holds every expert; a smaller --vram leaves some warm
(staged at decode: the step then shows the stage kernel and the waits it causes).
Usage: python -m bench.gpu_step_profile [--layers 4] [--tokens 64] [--vram 40GiB] [--cpu-share auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from bench.overrides import fix_cpu_rate
from bench.report import update_section
from moe_tier.engine import Engine
from moe_tier.moe_decode import device_path_possible
from moe_tier.stats import EngineStats
from moe_tier.synth import mixtral_8x7b, write_fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before the profiled steps (the context)")
    ap.add_argument("--vram", default="40GiB")
    ap.add_argument("--out", default="/tmp/moe-tier-profile.gguf")
    ap.add_argument("--cpu-share", default="auto", help="the CPU's share of each staged expert: auto, or a fraction "
                    "(0 = off)")
    ap.add_argument("--cpu-rate", type=float, help="GB/s: take this CPU rate instead of measuring it (which path a "
                    "warm expert takes follows from it: moe_decode.device_path_possible)")
    args = ap.parse_args()
    if args.cpu_rate is not None:
        fix_cpu_rate(args.cpu_rate)
    path = Path(args.out)
    if not path.exists():
        write_fast(path, mixtral_8x7b(n_layer=args.layers))
    ctx = args.prompt + args.tokens + 16
    eng = Engine.open(path, vram=args.vram, ctx=ctx, policy="lfu",
                      cpu_share=None if args.cpu_share == "auto" else float(args.cpu_share))
    cache = eng.model.new_cache(ctx)
    logits = eng.step(cache, np.random.default_rng(0).integers(3, eng.n_vocab, args.prompt))
    token = lambda: np.array([int(np.argmax(logits[-1]))])  # noqa: E731
    for _ in range(3):  # capture and warm up
        logits = eng.step(cache, token())
    count = getattr(eng.model.ops.moe, "account", lambda: None)  # the device path counts a step one step late
    count()
    torch.cuda.synchronize()
    eng.stats = eng.tiers.stats = EngineStats()  # count the timed steps only
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        logits = eng.step(cache, token())
    step_ms = (time.perf_counter() - t0) / args.tokens * 1e3
    count()
    rates = {k: round(v, 3) for k, v in eng.tiers.stats.hit_rates().items()}
    waits = {what: round(sec / args.tokens * 1e3, 3) for what, sec in eng.tiers.stats.waits.items()}
    n_slots, n_experts = sum(g.n_slots for g in eng.plan.gpus), len(eng.desc.experts)
    n_prof = 8
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n_prof):
            logits = eng.step(cache, token())
        torch.cuda.synchronize()
        prof_ms = (time.perf_counter() - t0) / n_prof * 1e3
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us > 0 and ev.count:
            rows.append((us / n_prof, ev.count / n_prof, ev.key[:90]))
    rows.sort(reverse=True)
    kernel_us = sum(r[0] for r in rows)
    busy_us = busy(prof) / n_prof
    L = args.layers
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in eng.tiers.speeds.as_gb_per_s().items())
    why = device_path_possible(eng.tiers)
    share = getattr(eng.model.ops.moe, "cpu", None)
    body = (f"{torch.cuda.get_device_name(0)}; Mixtral-8x7B shape with {L} layers, Q4_K, --vram {args.vram}: {n_slots} "
            f"slots for {n_experts} experts, uses served {rates}; links {speeds}"
            f"{' (CPU rate given)' if args.cpu_rate is not None else ''}; "
            f"{'routing stays on the device' if why is None else 'routing read back: ' + why}"
            f"{'' if share is None else f', the CPU computing {share.fraction():.0%} of each staged expert'} "
            f"(graphs: {eng._graphs is not None}); step wall time {step_ms:.3f} ms, kernel time {kernel_us / 1e3:.3f} ms "
            f"(profiled: the GPU busy {busy_us / 1e3:.3f} ms of a {prof_ms:.3f} ms step; host waits per token, ms: {waits}), "
            f"{sum(r[1] for r in rows):.0f} kernels a token ({sum(r[1] for r in rows) / L:.1f} a layer).\n\n"
            "| kernel | per token | per layer | us per token | us per layer |\n| --- | ---: | ---: | ---: | ---: |\n")
    body += "".join(f"| `{name}` | {n:.0f} | {n / L:.1f} | {us:.1f} | {us / L:.1f} |\n" for us, n, name in rows[:40])
    print(body)
    every_expert_hot = n_slots >= n_experts
    update_section("GPU decode step profile" + ("" if every_expert_hot else ", some experts warm"),
                   "python -m bench.gpu_step_profile " + " ".join(sys.argv[1:]), body)


def busy(prof) -> float:
    """Microseconds in which some GPU kernel or copy ran (the union of their intervals, streams overlapping): the
    rest of a step's wall time the GPU idled, waiting on the host."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


if __name__ == "__main__":
    main()
