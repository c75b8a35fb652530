"""Whole-engine decode on one GPU: a Mixtral-8x7B-shaped Q4_K file under VRAM budgets, against the floor.

The file (26 GB) is written with the fast synthetic writer; random weights route almost uniformly, so this is
the hard case for any cache. Per budget: prefill of a prompt, then greedy decode; tokens/s, expert bytes moved
per token over each link, hit rates, and the floor (bytes that must cross each link per token / its measured
rate). The peer, in the same run: llama.cpp's CUDA llama-bench (--llama-bench BIN) with -ngl 99 and the
-ncmoe that keeps as many layers' experts on the GPU as the same budget holds (estimated from the plan's fixed
part and the experts' bytes per layer; llama-bench reports no memory use).
Usage: python -m bench.gpu_decode [--vram 12GiB,24GiB] [--tokens 32] [--prompt 64] [--out /tmp/mixtral.gguf]
       [--llama-bench /path/to/llama-bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import update_section
from moe_tier.engine import Engine
from moe_tier.models import Segment
from moe_tier.stats import EngineStats
from moe_tier.synth import mixtral_8x7b, write_fast
from moe_tier.units import format_bytes, parse_bytes


def run(path: Path, vram: str, n_prompt: int, n_tokens: int) -> dict:
    t0 = time.perf_counter()
    eng = Engine.open(path, vram=vram, ctx=n_prompt + n_tokens + 8)
    open_s = time.perf_counter() - t0
    model, ops = eng.model, eng.model.ops
    cache = model.new_cache(n_prompt + n_tokens + 8)
    prompt = np.random.default_rng(0).integers(3, eng.n_vocab, n_prompt)
    t0 = time.perf_counter()
    logits = ops.to_host(model.forward(prompt, [Segment(cache, 0, n_prompt)], last_only=True))
    prefill_s = time.perf_counter() - t0
    eng.stats = eng.tiers.stats = EngineStats()  # count decode only
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(np.argmax(logits[-1]))
        logits = ops.to_host(model.forward(np.array([token]), [Segment(cache, 0, 1)], last_only=True))
    decode_s = time.perf_counter() - t0
    s, speeds = eng.tiers.stats, eng.tiers.speeds
    moved = {link: c.bytes / n_tokens for link, c in s.links.items()}
    # Floor for the bytes this run moved: each link busy the whole token, links in parallel.
    pcie = moved.get("warm->gpu", 0) + moved.get("disk->gpu", 0)
    disk = moved.get("disk->gpu", 0) + moved.get("disk->cpu", 0)
    floor_s = max(pcie / speeds.h2d_bytes_per_s, disk / speeds.disk_bytes_per_s)
    result = dict(vram=vram, slots=sum(g.n_slots for g in eng.plan.gpus), open_s=open_s,
                fixed_bytes=eng.plan.gpus[0].fixed_bytes, n_layer=eng.desc.config.n_layer,
                layer_expert_bytes=sum(e.n_bytes for e in eng.desc.experts.values()) // eng.desc.config.n_layer,
                prefill_tps=n_prompt / prefill_s, decode_tps=n_tokens / decode_s, moved=moved,
                rates={k: round(v, 3) for k, v in s.hit_rates().items()}, floor_tps=1 / floor_s if floor_s else float("inf"),
                speeds=speeds)
    eng.tiers.close()  # the next budget measures free memory: this engine's arena must be gone by then
    del eng, model, ops, cache
    gc.collect()
    torch.cuda.empty_cache()
    return result


def llama_cpp_peer(binary: str, path: Path, fixed_bytes: int, budget_bytes: int, layer_expert_bytes: int,
                   n_layer: int, n_prompt: int, n_tokens: int) -> dict:
    """llama-bench with every layer on the GPU and the first ncmoe layers' experts on the CPU."""
    on_gpu = max(0, min(n_layer, (budget_bytes - fixed_bytes) // layer_expert_bytes))
    ncmoe = n_layer - on_gpu
    out = subprocess.run([binary, "-m", str(path), "-ngl", "99", "-ncmoe", str(ncmoe), "-p", str(n_prompt),
                          "-n", str(n_tokens), "-r", "2", "-o", "jsonl"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    tps = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return dict(ncmoe=ncmoe, prefill_tps=tps.get("pp", 0.0), decode_tps=tps.get("tg", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vram", default="12GiB,24GiB")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench built with CUDA: the peer, in the same run")
    ap.add_argument("--out", default="/tmp/moe-tier-mixtral-8x7b-q4k.gguf")
    args = ap.parse_args()
    path = Path(args.out)
    if not path.exists():
        t0 = time.perf_counter()
        write_fast(path, mixtral_8x7b(n_layer=args.layers))
        print(f"wrote {path} ({format_bytes(path.stat().st_size)}) in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for vram in args.vram.split(","):
        parse_bytes(vram)
        r = run(path, vram, args.prompt, args.tokens)
        if args.llama_bench:
            r["peer"] = llama_cpp_peer(args.llama_bench, path, r["fixed_bytes"], parse_bytes(vram),
                                       r["layer_expert_bytes"], r["n_layer"], args.prompt, args.tokens)
        print(r, flush=True)
        rows.append(r)
    sp = rows[0]["speeds"]
    body = (f"Mixtral-8x7B shape ({args.layers} layers), Q4_K (synthetic, random weights: near-uniform routing), {args.prompt}-token prompt, "
            f"{args.tokens} greedy tokens. Measured links: host->GPU {sp.h2d_bytes_per_s / 1e9:.1f} GB/s, disk "
            f"{sp.disk_bytes_per_s / 1e9:.2f} GB/s, CPU experts {sp.cpu_bytes_per_s / 1e9:.1f} GB/s.\n\n"
            "| VRAM | slots | open s | prefill tok/s | decode tok/s | floor tok/s | moved per token | hit rates "
            "| llama.cpp (-ncmoe) prefill / decode tok/s | decode ratio |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |\n")
    for r in rows:
        moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in r["moved"].items()) or "-"
        peer = r.get("peer")
        versus = (f"{peer['prefill_tps']:.1f} / {peer['decode_tps']:.2f} ({peer['ncmoe']}) | "
                  f"{r['decode_tps'] / peer['decode_tps']:.2f}x" if peer else "not run | -")
        body += (f"| {r['vram']} | {r['slots']} | {r['open_s']:.0f} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                 f"{r['floor_tps']:.1f} | {moved} | {r['rates']} | {versus} |\n")
    body += ("\nfloor: tokens/s if each link only carried this run's bytes at its measured rate (PCIe and disk in "
             "parallel); the gap to it is compute, synchronisation and Python time.\n")
    body += "The decode loop reads routing back to the host every layer.\n"
    print(body)
    update_section("GPU decode (Mixtral-8x7B shape, Q4_K)", "python -m bench.gpu_decode " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
