"""Whole-model CPU decode: moe-tier's engine against llama.cpp (llama-cpp-python) on the same synthetic file.

A Mixtral-shaped model, scaled down so it fits this machine's RAM and a benchmark run's minutes, is written
with the fast synthetic writer; both engines run greedy decode from the same prompt with the same threads.
Usage: python -m bench.cpu_decode [--qtype Q4_K] [--tokens 32] [--threads N] [--out /tmp/bench-model.gguf]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np

from bench.report import update_section
from moe_tier.engine import Engine
from moe_tier.synth import mixtral_8x7b
from moe_tier.synth.fast import write_fast


def llama_cpp_decode(path: Path, prompt: list[int], n: int, threads: int) -> tuple[float, float]:
    import llama_cpp

    ref = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    t0 = time.perf_counter()
    ref.eval(prompt)
    prefill = time.perf_counter() - t0
    token = 1  # decode speed does not depend on which token is fed back
    t0 = time.perf_counter()
    for _ in range(n):
        ref.eval([token])
    return len(prompt) / prefill, n / (time.perf_counter() - t0)


def moe_tier_decode(path: Path, prompt: list[int], n: int) -> tuple[float, float, Engine]:
    eng = Engine.open(path, ctx=len(prompt) + n + 8)
    list(eng.generate_tokens(prompt[:4], 2))  # compile / warm the kernels outside the timing
    eng.stats.__init__()
    list(eng.generate_tokens(prompt, n))
    s = eng.stats
    return s.prompt_tokens / s.prompt_seconds, s.generated_tokens / s.generate_seconds, eng


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="/tmp/moe-tier-bench-cpu.gguf")
    args = ap.parse_args()
    # Mixtral's proportions at a quarter of the width and 8 layers: 8 experts, top-2, GQA 4:1.
    spec = mixtral_8x7b(n_layer=8, n_embd=1024, n_ff_exp=3584, n_head=8, n_head_kv=2, head_dim=128,
                        qtype=args.qtype, n_ctx=4096)
    path = Path(args.out)
    if not path.exists():
        write_fast(path, spec)
    numba.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # a shared machine: other processes move the absolute numbers
    prompt = list(np.random.default_rng(0).integers(3, spec.n_vocab, 64))
    ours_pp, ours_tg, eng = moe_tier_decode(path, prompt, args.tokens)
    ref_pp, ref_tg = llama_cpp_decode(path, prompt, args.tokens, args.threads)
    per_token = eng.stats.dense_bytes_per_token + eng.stats.decode_expert_bytes / max(eng.stats.generated_tokens, 1)
    rows = [
        ("moe-tier", ours_pp, ours_tg, per_token / 2**20, per_token * ours_tg / 1e9),
        ("llama.cpp", ref_pp, ref_tg, per_token / 2**20, per_token * ref_tg / 1e9),
    ]
    table = ("| engine | prefill tok/s (64) | decode tok/s | MiB weights / token | GB/s |\n"
             "| --- | ---: | ---: | ---: | ---: |\n")
    table += "".join(f"| {n} | {pp:.1f} | {tg:.2f} | {mib:.1f} | {gbs:.2f} |\n" for n, pp, tg, mib, gbs in rows)
    table += (f"\nratio moe-tier / llama.cpp: prefill {ours_pp / ref_pp:.2f}x, decode {ours_tg / ref_tg:.2f}x. "
              f"Model: {path.name}, {spec.qtype.name}, {spec.n_layer} layers, {spec.n_embd} wide, "
              f"{spec.n_expert} experts of {spec.n_ff_exp} (top-{spec.n_expert_used}), "
              f"{path.stat().st_size / 2**30:.2f} GiB; {args.threads} threads, {args.tokens} greedy tokens. "
              f"1-minute load average at start: {load:.2f} on {os.cpu_count()} cores.\n")
    print(table)
    update_section(f"CPU decode ({spec.qtype.name}, {args.threads} threads)", "python -m bench.cpu_decode " + " ".join(sys.argv[1:]), table)


if __name__ == "__main__":
    main()
