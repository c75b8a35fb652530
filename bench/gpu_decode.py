"""Whole-engine decode on one GPU: a Mixtral-8x7B-shaped Q4_K file under VRAM budgets, against the floor.

The file (26 GB) is written with the fast synthetic writer; random weights route almost uniformly, so this is
the hard case for any cache. Per budget: prefill of a prompt, then greedy decode; tokens/s, expert bytes moved
per token over each link, hit rates, and the floor (bytes that must cross each link per token / its measured
rate). The peer, in the same run: llama.cpp's CUDA llama-bench (--llama-bench BIN) with -ngl 99 and the
-ncmoe that keeps as many layers' experts on the GPU as the same budget holds (estimated from the plan's fixed
part and the experts' bytes per layer; llama-bench reports no memory use).
--replay TRACE (a moe-tier trace, e.g. the real Mixtral-8x7B routing: `moe-tier trace import
../shared/data/routing/mixtral-8x7b-instruct-gsm8k.jsonl --n-expert 8 --arch llama --out mixtral.npz`): BENCHMARK
ONLY, the router's choice is replaced, token after token, by the recorded routing, labelled as such in the output;
llama.cpp cannot be given another routing, so its row stays the uniform-routing one.
Usage: python -m bench.gpu_decode [--vram 12GiB,24GiB] [--tokens 256] [--prompt 512] [--out /tmp/mixtral.gguf]
       [--policy lfu,lru] [--lookahead 0,1,2] [--cpu-share auto,0] [--replay TRACE] [--llama-bench BIN]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.gpu_tiers import d2d_bytes_per_s
from bench.overrides import read_back_always
from bench.report import update_section
from moe_tier.engine import Engine
from moe_tier.moe import Routing
from moe_tier.stats import EngineStats
from moe_tier.synth import mixtral_8x7b, write_fast
from moe_tier.units import format_bytes, parse_bytes
from router_predict.trace import load as load_trace


class ReplayedRouter:
    """BENCHMARK ONLY: ops.route replaced by recorded routing; the token at position p takes trace row p (wrapping
    around). In a captured decode graph the row comes from the step's device-side position."""

    def __init__(self, ops, ids: np.ndarray, weights: np.ndarray, n_layer: int):
        self.ops, self.n_layer = ops, n_layer
        self.ids = torch.from_numpy(ids.astype(np.int32)).to(ops.device)  # (N, layers, k)
        self.weights = torch.from_numpy(weights.astype(np.float32)).to(ops.device)
        self.calls = self.token = 0

    def __call__(self, router: str, h, bias):
        layer, T = self.calls % self.n_layer, h.shape[0]
        self.calls += 1
        if self.ops.static is not None:
            rows = self.ops.static.pos % len(self.ids)
        else:
            rows = torch.arange(self.token, self.token + T, device=self.ops.device) % len(self.ids)
            if self.calls % self.n_layer == 0:
                self.token += T
        routing = Routing(self.ids[rows, layer], self.weights[rows, layer])
        return routing if self.ops.device_routing else routing.host()


def run(path: Path, vram: str, n_prompt: int, n_tokens: int, policy: str, replay: Path | None, lookahead: int,
        cpu_share: float | None) -> dict:
    t0 = time.perf_counter()
    eng = Engine.open(path, vram=vram, ctx=n_prompt + n_tokens + 8, policy=policy, lookahead=lookahead,
                      cpu_share=cpu_share)
    open_s = time.perf_counter() - t0
    model, ops = eng.model, eng.model.ops
    if replay is not None:
        trace = load_trace(replay)
        ops.route = ReplayedRouter(ops, trace.expert_ids, trace.weights, eng.desc.config.n_layer)
    prompt = np.random.default_rng(0).integers(3, eng.n_vocab, n_prompt)
    # A warm-up prefill, as llama-bench runs one: Triton compiles outside the timing (the tiers keep what it
    # promoted, as after any earlier prompt).
    eng.step(model.new_cache(n_prompt), prompt)
    if replay is not None:
        ops.route.token = 0  # the timed prompt replays the trace from its first row again
    cache = model.new_cache(n_prompt + n_tokens + 8)
    t0 = time.perf_counter()
    logits = eng.step(cache, prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = eng.step(cache, np.array([int(np.argmax(logits[-1]))]))  # a first decode step captures its graph
    first_s = time.perf_counter() - t0
    if hasattr(ops.moe, "account"):
        ops.moe.account()
    dense_bytes = eng.stats.dense_bytes_per_token
    eng.stats = eng.tiers.stats = EngineStats()  # count decode only
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = eng.step(cache, np.array([int(np.argmax(logits[-1]))]))
    decode_s = time.perf_counter() - t0
    if hasattr(ops.moe, "account"):  # no local reference: the arena must be freeable below
        ops.moe.account()
    s, speeds = eng.tiers.stats, eng.tiers.speeds
    moved = {link: c.bytes / n_tokens for link, c in s.links.items()}
    # Floor for the bytes this run moved: each link busy the whole token, links in parallel.
    pcie = sum(b for link, b in moved.items() if "->gpu" in link)
    disk = moved.get("disk->gpu", 0) + moved.get("disk->cpu", 0)
    cpu = moved.get("warm->cpu share", 0)  # the CPU's rows of staged experts, read from RAM beside the link
    hbm = s.tiers["hot"].bytes / n_tokens + dense_bytes if "hot" in s.tiers else 0
    hbm_bytes_per_s = d2d_bytes_per_s()  # a device copy's read + write rate: what HBM moves
    apart_s = max(pcie / speeds.h2d_bytes_per_s, disk / speeds.disk_bytes_per_s, hbm / hbm_bytes_per_s,
                  cpu / speeds.cpu_bytes_per_s)
    # The link and the CPU both read host RAM: together no faster than it served them when measured at once.
    floor_s = max(apart_s, (pcie + cpu) / speeds.host_bytes_per_s if speeds.host_bytes_per_s else 0.0)
    cpu_part = ops.moe.cpu.fraction() if getattr(ops.moe, "cpu", None) is not None else 0.0
    result = dict(vram=vram, policy=policy, lookahead=lookahead, cpu_share=cpu_part, routing="replayed (benchmark only)" if replay else "model's own",
                  device_path=type(ops.moe).__name__ == "DeviceMoE", graphs=eng._graphs is not None, first_s=first_s,
                  slots=sum(g.n_slots for g in eng.plan.gpus), open_s=open_s,
                fixed_bytes=eng.plan.gpus[0].fixed_bytes, n_layer=eng.desc.config.n_layer,
                layer_expert_bytes=sum(e.n_bytes for e in eng.desc.experts.values()) // eng.desc.config.n_layer,
                prefill_tps=n_prompt / prefill_s, decode_tps=n_tokens / decode_s, moved=moved,
                rates={k: round(v, 3) for k, v in s.hit_rates().items()}, floor_tps=1 / floor_s if floor_s else float("inf"),
                apart_tps=1 / apart_s if apart_s else float("inf"),
                speeds=speeds)
    eng.tiers.close()  # the next budget measures free memory: this engine's arena must be gone by then
    del eng, model, ops, cache
    gc.collect()
    torch.cuda.empty_cache()
    return result


PEER_BUILD_WAIT_S = 420


def llama_cpp_peer(binary: str, path: Path, fixed_bytes: int, budget_bytes: int, layer_expert_bytes: int,
                   n_layer: int, n_prompt: int, n_tokens: int) -> dict:
    """llama-bench with every layer on the GPU and the first ncmoe layers' experts on the CPU. The binary may
    still be building when our runs start (the device session builds it alongside): wait for it."""
    for _ in range(PEER_BUILD_WAIT_S):
        if os.access(binary, os.X_OK):  # the linker sets the mode last
            time.sleep(2)
            break
        time.sleep(1)
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
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--policy", default="lfu", help="slot policies to run, comma-separated (tiers.slots.POLICIES)")
    ap.add_argument("--replay", type=Path, help="BENCHMARK ONLY: replace the routing by this recorded one")
    ap.add_argument("--lookahead", default="0,1,2", help="gate lookahead distances to run, 0 = off (replayed rows run "
                    "0 only: the lookahead predicts the model's own router, not the replayed one)")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench built with CUDA: the peer, in the same run")
    ap.add_argument("--out", default="/tmp/moe-tier-mixtral-8x7b-q4k.gguf")
    ap.add_argument("--cpu-share", default="auto", help="CPU shares of each staged expert to run, comma-separated: "
                    "auto (balanced by the measured rates), or a fraction (0 = off)")
    ap.add_argument("--read-back", action="store_true", help="BENCHMARK ONLY: decode reads routing back every layer "
                    "(the path of a CPU twice the link's rate), the measured rates placing each miss")
    args = ap.parse_args()
    if args.read_back:
        read_back_always()
    path = Path(args.out)
    if not path.exists():
        t0 = time.perf_counter()
        write_fast(path, mixtral_8x7b(n_layer=args.layers))
        print(f"wrote {path} ({format_bytes(path.stat().st_size)}) in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, peers = [], {}
    for vram in args.vram.split(","):
        parse_bytes(vram)
        for replay in [None] + ([args.replay] if args.replay else []):
            for policy in args.policy.split(","):
                for lookahead in [int(d) for d in args.lookahead.split(",") if replay is None or int(d) == 0]:
                    for share in args.cpu_share.split(","):
                        rows.append(run(path, vram, args.prompt, args.tokens, policy, replay, lookahead,
                                        None if share == "auto" else float(share)))
                        print(rows[-1], flush=True)
    for r in rows:  # the peer after ours: nothing of ours is lost if it fails
        if args.llama_bench and r["vram"] not in peers:
            peers[r["vram"]] = llama_cpp_peer(args.llama_bench, path, r["fixed_bytes"], parse_bytes(r["vram"]),
                                              r["layer_expert_bytes"], r["n_layer"], args.prompt, args.tokens)
            print("llama.cpp", r["vram"], peers[r["vram"]], flush=True)
        r["peer"] = peers.get(r["vram"])
    sp = rows[0]["speeds"]
    body = (f"Mixtral-8x7B shape ({args.layers} layers), Q4_K (synthetic, random weights: near-uniform routing), {args.prompt}-token prompt, "
            f"{args.tokens} greedy tokens. Measured links: host->GPU {sp.h2d_bytes_per_s / 1e9:.1f} GB/s, disk "
            f"{sp.disk_bytes_per_s / 1e9:.2f} GB/s, CPU experts {sp.cpu_bytes_per_s / 1e9:.1f} GB/s"
            + (f", host RAM to the link and the CPU at once {sp.host_bytes_per_s / 1e9:.1f} GB/s" if sp.host_bytes_per_s else "")
            + ".\n\n"
            "| VRAM | routing | policy | lookahead | CPU share | slots | open s | prefill tok/s | decode tok/s | floor tok/s "
            "(links apart) | time / floor | moved per token | hit rates | llama.cpp (-ncmoe) prefill / decode tok/s | decode ratio |\n"
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |\n")
    for r in rows:
        moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in r["moved"].items()) or "-"
        peer = r.get("peer")
        versus = (f"{peer['prefill_tps']:.1f} / {peer['decode_tps']:.2f} ({peer['ncmoe']}) | "
                  f"{r['decode_tps'] / peer['decode_tps']:.2f}x" if peer else "not run | -")
        body += (f"| {r['vram']} | {r['routing']} | {r['policy']} | {r['lookahead'] or 'off'} | {r['cpu_share']:.0%} | {r['slots']} | {r['open_s']:.0f} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                 f"{r['floor_tps']:.1f} ({r['apart_tps']:.1f}) | {r['floor_tps'] / r['decode_tps']:.2f}x | {moved} | "
                 f"{r['rates']} | {versus} |\n")
    body += ("\nfloor: tokens/s if each link only carried this run's bytes at its measured rate, links in parallel: "
             "PCIe (warm reads and copies), disk, HBM (hot experts and dense weights at the device copy rate) and the "
             "CPU's share of staged experts at its measured rate, and PCIe's and the CPU's bytes together at the rate "
             "host RAM served both when measured at once (at start-up, beside the CPU share's calibration); in "
             "brackets the floor without that last term (links apart, as if each had host RAM of its own). The gap "
             "to it is kernel efficiency, small kernels and waiting: at batch 1 a miss is known only when its layer "
             "routes, so its bytes cross while the GPU waits.\n")
    body += ("Decode keeps routing on the GPU (" + ("yes" if rows[0]["device_path"] else "no") + ("; routing read back "
             "every layer forced by --read-back, benchmark only" if args.read_back else "") + "), each step one CUDA "
             "graph replay (" + ("yes" if rows[0]["graphs"] else "no") + f"; its capture, {rows[0]['first_s']:.1f} s, is "
             "outside the timed steps): a warm expert chosen by a token is copied from pinned memory into a staging "
             "slot by a kernel ('warm->gpu read'; with a CPU share, the GPU's part by the copy engine, queued by the host "
             "as the GPU publishes the layer's warm experts, while the CPU computes the first rows of gate and up from "
             "the same pinned blob: 'warm->cpu share'; the CPU share column is its part of a staged expert's bytes), "
             "promotions into slots are DMA copies ('warm->gpu'). Lookahead d: the router "
             "of the MoE layer d later on this layer's input predicts its experts, and the warm ones are staged while the "
             "layers between compute ('warm->gpu ahead', all of them, used or not; uses of them count as 'ahead'). Replayed rows: the router's "
             "choice replaced by real Mixtral-8x7B routing (GSM8K), a benchmark-only override; llama.cpp's ratio there "
             "is against its uniform-routing run.\n")
    print(body)
    update_section("GPU decode (Mixtral-8x7B shape, Q4_K)", "python -m bench.gpu_decode " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
