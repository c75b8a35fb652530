"""Cost of one planner decision (`plan_step`) per layer step, called from Python as the engine will.

Shape: 48 MoE layers x 64 experts (top-8), 1,000 GPU slots, lookahead 4, at most 8 prefetches; routing
and predictions are random, so every step has misses, evictions and prefetch candidates.
"""

from __future__ import annotations

import time

import numpy as np

from bench.report import update_section
from router_predict.planner import plan_step

L, E, K, D, P = 48, 64, 8, 4, 8
H2D_BYTES_PER_S = 51 * 2**30  # measured H100 host: pinned host -> GPU
CPU_BYTES_PER_S = 55 * 2**30  # host RAM read with 16 threads
DISK_BYTES_PER_S = 1.6e9
EXPERT_BYTES = 3 * 2048 * 768 * 144 // 256  # a Qwen3-30B-A3B-sized Q4_K expert


def run(n_gpu: int, slots: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    X = L * E
    slot_expert = np.full((n_gpu, slots // n_gpu), -1, np.int32)
    expert_slot = np.full(X, -1, np.int32)
    first = rng.permutation(X)[:slots].astype(np.int32)
    slot_expert.ravel()[:] = first
    expert_slot[first] = np.arange(slots)
    remaining = np.zeros(X, np.int64)
    on_disk = np.zeros(X, bool)
    expert_bytes = np.full(X, EXPERT_BYTES, np.int64)
    recent = rng.dirichlet(np.ones(E), L).astype(np.float32) * K
    ahead = np.zeros((D, E), np.float32)
    backlog = np.zeros(n_gpu)
    actions, prefetch = np.empty(K, np.int8), np.empty(P, np.int64)
    times = np.empty(steps)
    for s in range(steps):
        layer = s % L
        needed = (layer * E + rng.choice(E, K, replace=False)).astype(np.int64)
        ahead[:] = rng.dirichlet(np.ones(E), D) * K
        t0 = time.perf_counter()
        plan_step(layer, needed, ahead, recent, slot_expert, expert_slot, remaining, on_disk, expert_bytes,
                  H2D_BYTES_PER_S, CPU_BYTES_PER_S, DISK_BYTES_PER_S, 2e-4, backlog, 1.0, actions, prefetch)
        times[s] = time.perf_counter() - t0
        remaining[:] = 0  # transfers land before the next step
    return times


def main() -> None:
    rng = np.random.default_rng(0)
    run(1, 1000, 10, rng)  # compile
    rows = []
    for n_gpu, slots in ((1, 1000), (2, 1000), (1, 250), (1, 3000)):
        us = run(n_gpu, slots, 20_000, rng) * 1e6
        rows.append((n_gpu, slots, np.median(us), np.percentile(us, 99), us.mean()))
    body = "Planner cost per layer step (48 layers x 64 experts, top-8, lookahead 4, up to 8 prefetches; " \
           "one `plan_step` call from Python, random routing). Target: under 50 us at 64 experts and " \
           "1,000 slots.\n\n| GPUs | slots | median us | p99 us | mean us |\n|---|---|---|---|---|\n"
    body += "".join(f"| {g} | {s} | {m:.1f} | {p:.1f} | {a:.1f} |\n" for g, s, m, p, a in rows)
    update_section("planner-cost", "python -m bench.planner_cost", body)
    print(body)


if __name__ == "__main__":
    main()
