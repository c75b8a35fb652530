"""Cost of the planner per layer step: its predictions (`online.update`) and its decision (`plan_step`).

Shape: 48 MoE layers x 64 experts (top-8), 1,000 GPU slots, lookahead 4 (and 8), at most 8 prefetches;
routing and predictions are random, so every step has misses, evictions and prefetch candidates; the predictions
take the costlier path (fitted next visits, gate lookahead for this token's next layers and the next token's;
one random row stands in for the latter). Two timings: the two calls from Python, as
the planner makes them (numba's argument dispatch included), and the compiled work alone (steps run back
to back inside one compiled loop). Then the planner as the engine calls it (tiers.live_planner.LivePlanner.step).
Usage: python -m bench.planner_cost
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from bench.report import update_section
from moe_tier.reader import ExpertId
from moe_tier.tiers.links import LinkSpeeds, balanced_share
from moe_tier.tiers.live_planner import LivePlanner
from moe_tier.tiers.slots import SlotTable
from router_predict.next_visit import DECAY
from router_predict.online import update
from router_predict.planner import plan_step

L, E, K, D, P = 48, 64, 8, 4, 8
H2D_BYTES_PER_S = 51 * 2**30  # measured H100 host: pinned host -> GPU
CPU_BYTES_PER_S = 55 * 2**30  # host RAM read with 16 threads
DISK_BYTES_PER_S = 1.6e9
STAGE_CPU_SHARE = balanced_share(CPU_BYTES_PER_S, H2D_BYTES_PER_S)  # the CPU's part of a staged miss, as decode sets it
EXPERT_BYTES = 3 * 2048 * 768 * 144 // 256  # a Qwen3-30B-A3B-sized Q4_K expert
GPU_STEP_S = 2e-4


def setup(n_gpu: int, slots: int, steps: int, rng: np.random.Generator, distance: int = D):
    X = L * E
    slot_expert = np.full((n_gpu, slots // n_gpu), -1, np.int32)
    expert_slot = np.full(X, -1, np.int32)
    first = rng.permutation(X)[:slots].astype(np.int32)
    slot_expert.ravel()[:] = first
    expert_slot[first] = np.arange(slots)
    needed = np.stack([(s % L) * E + rng.choice(E, K, replace=False) for s in range(steps)]).astype(np.int64)
    gate = rng.dirichlet(np.ones(E), (steps, distance)).astype(np.float32)  # (steps, D, E) gate lookahead
    recent = (rng.dirichlet(np.ones(E), L) * K).astype(np.float32)
    return slot_expert, expert_slot, needed, gate, recent, predictors(rng, distance)


def predictors(rng: np.random.Generator, distance: int) -> tuple:
    """Random tables of the shapes `Combined`, `TokenReuse` and `NextVisit` fit."""
    prior = (rng.dirichlet(np.ones(E), L) * K).astype(np.float32)  # (L, E)
    cross = (rng.dirichlet(np.ones(E), (distance, L, E)) * K).astype(np.float32)  # (D, L, E, E)
    reuse = (rng.dirichlet(np.ones(E), (L, E)) * K).astype(np.float32)  # (L, E, E)
    mix = np.tile([0.2, 0.4, 0.4], (distance, 1))  # (D, 3)
    visit_weights = rng.normal(0.0, 0.3, 4 + len(DECAY))  # (F,)
    forgetting = np.repeat(prior[None], len(DECAY), 0)  # (H, L, E)
    return prior, cross, mix, reuse, prior + 1.0, prior.copy(), visit_weights, forgetting


@njit(cache=True)
def predict(layer, needed, gate, recent, ahead, tables):
    prior, cross, mix, reuse, counts, decayed, visit_weights, forgetting = tables
    shares = np.full(K, 1.0 / K)
    update(layer, needed % E, shares, prior, cross, mix, reuse, gate[: min(ahead.shape[0], L - 1 - layer)], 0.8,
           gate[0], 0.3, counts, decayed, 0.9, 0.5, 0.3, visit_weights, forgetting, DECAY, recent, ahead)


@njit(cache=True)
def run_compiled(slot_expert, expert_slot, needed, gate, recent, tables):
    X = expert_slot.shape[0]
    ahead = np.zeros((tables[2].shape[0], E), np.float32)  # (D, E), D from mix
    remaining, on_disk = np.zeros(X, np.int64), np.zeros(X, np.bool_)
    expert_bytes = np.full(X, EXPERT_BYTES, np.int64)
    backlog = np.zeros(slot_expert.shape[0])
    actions, prefetch = np.empty(K, np.int8), np.empty(P, np.int64)
    total = 0
    for s in range(needed.shape[0]):
        predict(s % L, needed[s], gate[s], recent, ahead, tables)
        total += plan_step(s % L, needed[s], ahead, recent, slot_expert, expert_slot, remaining, on_disk,
                           expert_bytes, H2D_BYTES_PER_S, CPU_BYTES_PER_S, DISK_BYTES_PER_S, STAGE_CPU_SHARE,
                           GPU_STEP_S, backlog, 1.0, 1.5, 0.0, actions, prefetch)
        remaining[:] = 0  # transfers land before the next step
    return total


def run_python(slot_expert, expert_slot, needed, gate, recent, tables) -> np.ndarray:
    X = expert_slot.shape[0]
    ahead = np.zeros((tables[2].shape[0], E), np.float32)  # (D, E), D from mix
    prior, cross, mix, reuse, counts, decayed, visit_weights, forgetting = tables
    shares = np.full(K, 1.0 / K)
    remaining, on_disk = np.zeros(X, np.int64), np.zeros(X, bool)
    expert_bytes = np.full(X, EXPERT_BYTES, np.int64)
    backlog = np.zeros(slot_expert.shape[0])
    actions, prefetch = np.empty(K, np.int8), np.empty(P, np.int64)
    times = np.empty(needed.shape[0])
    for s in range(needed.shape[0]):
        t0 = time.perf_counter()
        layer = s % L
        ahead_gate = gate[s, : min(ahead.shape[0], L - 1 - layer)]
        update(layer, needed[s] % E, shares, prior, cross, mix, reuse, ahead_gate, 0.8, gate[s, 0], 0.3, counts,
               decayed, 0.9, 0.5, 0.3, visit_weights, forgetting, DECAY, recent, ahead)
        plan_step(layer, needed[s], ahead, recent, slot_expert, expert_slot, remaining, on_disk, expert_bytes,
                  H2D_BYTES_PER_S, CPU_BYTES_PER_S, DISK_BYTES_PER_S, STAGE_CPU_SHARE, GPU_STEP_S, backlog, 1.0,
                  1.5, 0.0, actions, prefetch)
        times[s] = time.perf_counter() - t0
        remaining[:] = 0
    return times


def run_live(n_slots: int, steps: int, read_back: bool, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Seconds of each LivePlanner.step, the planner as the engine calls it: online.update and plan_step plus the
    Python that applies their decisions to the SlotTable (read_back: with prefetches; else decode on the device),
    and the copies into slots it decided a step."""
    experts = [ExpertId(m, e) for m in range(L) for e in range(E)]
    table = SlotTable(experts, {0: n_slots}, experts)
    for i in rng.permutation(len(experts))[:n_slots]:
        table.place(experts[i], 0)
    live = LivePlanner(dict.fromkeys(experts, EXPERT_BYTES), list(range(L)), E, K, table)
    speeds = LinkSpeeds(H2D_BYTES_PER_S, DISK_BYTES_PER_S, CPU_BYTES_PER_S)
    seconds, copies = np.empty(steps), 0
    for i in range(steps):
        tokens = {int(e): 1 for e in rng.choice(E, K, replace=False)}
        t0 = time.perf_counter()
        plan = live.step(i % L, tokens, speeds, GPU_STEP_S, STAGE_CPU_SHARE, read_back)
        seconds[i] = time.perf_counter() - t0
        copies += len(plan.placed) + len(plan.prefetch)
        for eid, _ in plan.placed + plan.prefetch:  # copies land before the next step
            live.landed(eid)
    return seconds[L * 10 :], copies / steps


def main() -> None:
    rng = np.random.default_rng(0)
    warm = setup(1, 1000, 10, rng)
    run_python(*warm)
    run_compiled(*warm)
    rows = []
    steps = 20_000
    for n_gpu, slots, distance in ((1, 1000, D), (2, 1000, D), (1, 250, D), (1, 3000, D), (1, 1000, 8)):
        us = run_python(*setup(n_gpu, slots, steps, rng, distance)) * 1e6
        args = setup(n_gpu, slots, steps, rng, distance)
        t0 = time.perf_counter()
        run_compiled(*args)
        compiled_us = (time.perf_counter() - t0) / steps * 1e6
        rows.append((n_gpu, slots, distance, np.median(us), np.percentile(us, 99), compiled_us))
    body = ("Planner cost per layer step, predictions (`online.update`) and decision (`plan_step`) together (48 "
            "layers x 64 experts, top-8, up to 8 prefetches, random routing, fitted next visits and gate "
            "lookahead for this token's next layers and the next token; layers ahead: the settings' "
            "max_distance, tuned between 4 and 8, with predictions and prefetch candidates for each). Target: "
            "under 50 us at 64 experts and 1,000 slots.\n\n"
            "| GPUs | slots | layers ahead | calls from Python, median us | p99 us | compiled work alone, mean us |\n"
            "|---|---|---|---|---|---|\n")
    body += "".join(f"| {g} | {s} | {d} | {m:.1f} | {p:.1f} | {c:.1f} |\n" for g, s, d, m, p, c in rows)
    live = [(read_back, *run_live(1000, 5_000, read_back, rng)) for read_back in (True, False)]
    body += ("\nIn the engine (`tiers.live_planner.LivePlanner.step`: the two calls plus the Python that applies their "
             "decisions to the SlotTable; the live planner's own settings, 8 layers ahead, no gate lookahead), same "
             "shape, 1 GPU, 1,000 slots. Each copy into a slot it decides costs a few microseconds of that Python; "
             "experts this small (1.7 MB) fit the idle link several at a time. On the device path the call runs while "
             "the GPU computes the next step.\n\n| path | median us | p99 us | copies into slots a step |\n"
             "|---|---|---|---|\n")
    body += "".join(f"| {'read back (prefetches too)' if rb else 'decode on the device (no prefetch)'} | "
                    f"{np.median(s) * 1e6:.1f} | {np.percentile(s, 99) * 1e6:.1f} | {c:.1f} |\n" for rb, s, c in live)
    update_section("planner-cost", "python -m bench.planner_cost", body)
    print(body)


if __name__ == "__main__":
    main()
