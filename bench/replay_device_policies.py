"""The live GPU decode path's slot policies (moe_decode.DeviceMoE) replayed over held-out routing.

The mechanism replayed is the live one, on the live classes (SlotTable, the policies of tiers.slots.POLICIES and
tiers.live_planner.LivePlanner): each step every chosen expert is read from its slot if its copy is done (hit),
else copied from pinned host memory into a staging slot by a kernel (miss). While the next step runs, the host
settles copies issued a step earlier and then, with LRU or LFU, touches the step's experts and for each miss of
each layer asks GpuTiers.promote's question: victim = the policy's choice among slot holders not used by that
layer; copy the miss over it only if policy.prefers(miss, victim). With the planner, one LivePlanner.step per layer
step (GpuTiers.planned, read_back False) decides the promotions and their victims (no prefetches on this path). Table changes
made then apply from the step after the running one, so a miss at step t reads from its slot from step t + 3 on,
and its victim is staged again from t + 2.
"static" never promotes (llama.cpp's fixed placement). The initial slots are the plan's (moe_tier/plan.py
ranking): uniform (rank r of every layer before rank r + 1) or by the fitting part's frequencies (a profile).
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench import mixtral_routing as mx
from bench.replay_policies import CPU_BYTES_PER_S, DISK_BYTES_PER_S, GIB, GPU_BYTES_PER_S, RESERVED_BYTES
from bench.report import update_section
from moe_tier.plan import _rank
from moe_tier.reader import ExpertId
from moe_tier.tiers.links import LinkSpeeds
from moe_tier.tiers.live_planner import LivePlanner
from moe_tier.tiers.slots import POLICIES, SlotTable
from router_predict.predictors import chosen
from router_predict.replay import slots_for_vram
from router_predict.trace import Trace, load, merge

STAGE_BYTES_PER_S = 51e9  # measured: the stage kernel's copy from pinned host memory (bench/gpu_host_reads.py, H100)
COPY_BYTES_PER_S = 52e9  # measured: pinned host -> slot DMA (bench/gpu_decode.py's 52.7 GB/s)
VRAM_GIB = (12, 16, 20, 24)
DEMO_TRACES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "demo-traces"
DEMO_SLOT_SHARES = (0.25, 0.5, 0.75)
POLICY_NAMES = ("lru", "lfu", "static", "planner", "planner + profile prior")


@dataclass(frozen=True)
class LiveResult:
    hit_rate: float
    read_bytes_per_token: float  # misses, staged from pinned memory over PCIe
    copy_bytes_per_token: float  # promotions, copied into slots
    ms_per_token: float
    decision_us: float  # host time of one promotion decision (victim + prefers; the planner: a layer step), mean


def ms_per_token(read_bytes: float, copy_bytes: float, hit_bytes: float, dense_bytes: float) -> float:
    """The slower of the two links a step keeps busy: PCIe (staging, then copies) and HBM (hit experts
    and the dense weights). Decode at batch 1 is bandwidth-bound, so compute time is left out."""
    pcie_s = read_bytes / STAGE_BYTES_PER_S + copy_bytes / COPY_BYTES_PER_S
    return 1e3 * max(pcie_s, (hit_bytes + dense_bytes) / GPU_BYTES_PER_S)


def replay_live(name: str, test: Trace, n_slots: int, initial: list[ExpertId], expert_bytes: int,
                dense_bytes: float, prior: dict[ExpertId, float] | None = None) -> LiveResult:
    """Replay `test` one token per step through DeviceMoE.account's promotion rule with policy `name`."""
    experts = [ExpertId(m, e) for m in range(test.n_moe_layers) for e in range(test.n_expert)]
    table = SlotTable(experts, {0: n_slots}, pinned=experts)
    for eid in initial[:n_slots]:
        table.place(eid, 0)
    planner = policy = None
    if name.startswith("planner"):
        planner = LivePlanner(dict.fromkeys(experts, expert_bytes), list(range(test.n_moe_layers)), test.n_expert,
                              test.n_expert_used, table, prior)
        speeds = LinkSpeeds(COPY_BYTES_PER_S, DISK_BYTES_PER_S, CPU_BYTES_PER_S)
        step_s = dense_bytes / test.n_moe_layers / GPU_BYTES_PER_S  # a layer step whose experts all hit
    else:  # static: touched, never asked
        policy = POLICIES["lru" if name == "static" else name]()
    ready, pending = set(table.slot_of), set()
    hits = misses = copies = 0
    decision_s, decisions = 0.0, 0
    last_step: list[list[ExpertId]] = []
    for t in range(test.n_tokens):
        step = [sorted(ExpertId(m, int(e)) for e in set(test.expert_ids[t, m].tolist())) for m in range(test.n_moe_layers)]
        step_hits = sum(eid in ready for wanted in step for eid in wanted)  # step t runs with the table as it is
        hits += step_hits
        misses += sum(map(len, step)) - step_hits
        ready |= pending  # while it runs, account() of step t - 1: settle() the copies issued a step earlier,
        for eid in pending if planner is not None else ():
            planner.landed(eid)
        pending = set()
        if planner is not None:
            for m, wanted in enumerate(last_step):
                start = time.perf_counter()
                plan = planner.step(m, dict.fromkeys((e.expert for e in wanted), 1), speeds, step_s, read_back=False)
                decision_s += time.perf_counter() - start
                decisions += 1
                for eid, _ in plan.evicted:
                    ready.discard(eid)
                    pending.discard(eid)
                pending |= {eid for eid, _ in (*plan.placed, *plan.prefetch)}
                copies += len(plan.placed) + len(plan.prefetch)
            last_step = step
            continue
        for wanted in last_step:  # touch every use, then promotions
            for eid in wanted:
                policy.touch(eid)
        for wanted in last_step:
            for eid in wanted:
                if eid in table.slot_of or name == "static":
                    continue
                if not table.n_free(0):
                    start = time.perf_counter()
                    victim = policy.victim(e for e in table.hot_on(0) if e not in wanted)
                    promote = victim is not None and policy.prefers(eid, victim)
                    decision_s += time.perf_counter() - start
                    decisions += 1
                    if not promote:
                        continue
                    table.evict(victim)
                    policy.forget(victim)
                    ready.discard(victim)
                    pending.discard(victim)
                table.place(eid, 0)
                pending.add(eid)
                copies += 1
        last_step = step
    table.check()
    n = max(test.n_tokens, 1)
    read, copied, hit = misses * expert_bytes / n, copies * expert_bytes / n, hits * expert_bytes / n
    return LiveResult(hits / max(hits + misses, 1), read, copied, ms_per_token(read, copied, hit, dense_bytes),
                      1e6 * decision_s / max(decisions, 1))


def initial_slots(fit: Trace, profile: bool) -> list[ExpertId]:
    """The plan's ranking (plan._rank) of the trace's experts: uniform, or by the fitting part's frequencies."""
    experts = [ExpertId(m, e) for m in range(fit.n_moe_layers) for e in range(fit.n_expert)]
    return _rank(SimpleNamespace(experts=experts), chosen(fit).sum(0) if profile else None)


def profile_prior(fit: Trace) -> dict[ExpertId, float]:
    """Chance of use per token of every expert in the fitting part."""
    share = chosen(fit).mean(0)
    return {ExpertId(m, e): float(share[m, e]) for m in range(fit.n_moe_layers) for e in range(fit.n_expert)}


def compare(folds: list[tuple[Trace, Trace]], n_slots: int, expert_bytes: int,
            dense_bytes: float) -> dict[tuple[str, str], dict[str, float]]:
    """(initial slots, policy) -> LiveResult's fields, the mean over folds."""
    out = {}
    for initial in ("uniform", "profile"):
        for name in POLICY_NAMES:
            if name == "planner + profile prior" and initial == "uniform":
                continue
            runs = [replay_live(name, test, n_slots, initial_slots(fit, initial == "profile"), expert_bytes,
                                dense_bytes, profile_prior(fit) if "prior" in name else None) for fit, test in folds]
            out[initial, name] = {f: float(np.mean([getattr(r, f) for r in runs]))
                                  for f in LiveResult.__dataclass_fields__}
    return out


def table(results: dict[tuple[str, str], dict[str, float]]) -> str:
    return HEADER + "".join(
        f"| {initial} | {name} | {r['hit_rate']:.3f} | {r['read_bytes_per_token'] / 1e6:,.0f} | "
        f"{r['copy_bytes_per_token'] / 1e6:,.0f} | {r['ms_per_token']:.1f} | {r['decision_us']:.1f} |\n"
        for (initial, name), r in results.items())


HEADER = ("| initial slots | policy | hit rate | MB staged / token | MB copied / token | est. ms / token | "
          "host us / decision |\n|---|---|---|---|---|---|---|\n")


def main() -> None:
    trace = mx.load()
    eb = mx.expert_bytes(trace)
    mixtral_folds = [(fit, test) for _, fit, test in mx.folds(trace)]
    body = (f"The live decode path's promotion rule (DeviceMoE.account + GpuTiers.promote) on the live policy "
            f"classes, one token per step. Cost model: staging copies at {STAGE_BYTES_PER_S / 1e9:.0f} GB/s "
            f"and promotion copies at {COPY_BYTES_PER_S / 1e9:.0f} GB/s share PCIe (measured, H100 host); hit "
            f"experts and dense weights at {GPU_BYTES_PER_S / 1e12:.1f} TB/s of HBM (assumed); ms / token = the "
            "slower of the two. A miss at step t is staged at t, t + 1 and t + 2 (it is counted while t + 1 runs, "
            "its copy lands before the next count) and read from its slot from t + 3. Initial slots: the plan's ranking, uniform or by the fitting "
            "part's frequencies (profile). \"planner + profile prior\" also gives the planner policy those "
            "frequencies as its prior (as the live path does with --profile). Host us / decision: "
            "victim + prefers on this dev box, Python; for the planner, one layer step of LivePlanner.step "
            "(predictions and plan_step, compiled, with its Python around them). The planner "
            "(tiers/live_planner.py) runs with LIVE_SETTINGS, whose admission (1.5x) and recency (0.4 over 10 "
            "tokens) were chosen by replaying the fitting parts here, and on this path issues no prefetches: "
            "with them (one a token, 95-110 MB, on Mixtral) it hit less than LFU on every trace, the link they "
            "take being the one every miss is staged through.\n")
    summary = []
    for vram in VRAM_GIB:
        slots = slots_for_vram(vram * GIB, RESERVED_BYTES, eb)
        results = compare(mixtral_folds, slots, int(eb[0]), mx.N_LAYER * mx.DENSE_LAYER_BYTES)
        summary.append((f"Mixtral-8x7B {vram} GiB", results))
        body += (f"\n### Mixtral-8x7B (GSM8K, both folds), {vram} GiB: {slots} slots for {eb.size} experts\n\n"
                 + table(results))
    demo = merge([load(p) for p in sorted(glob.glob(str(DEMO_TRACES / "*.npz")))])
    odd = np.isin(demo.sequence, demo.sequences()[::2])  # every other prompt: each domain on both sides
    demo_folds = [(demo.select(odd), demo.select(~odd)), (demo.select(~odd), demo.select(odd))]
    n_experts = demo.n_moe_layers * demo.n_expert
    for share in DEMO_SLOT_SHARES:
        slots = int(n_experts * share)
        results = compare(demo_folds, slots, mx.EXPERT_BYTES, demo.n_moe_layers * mx.DENSE_LAYER_BYTES)
        summary.append((f"demo {slots} of {n_experts} slots", results))
        body += (f"\n### demo qwen3moe ({demo.n_tokens} tokens of tests/fixtures/demo-traces, every other prompt "
                 f"fits, both folds; experts priced as Mixtral Q4_K), {slots} slots for {n_experts} experts\n\n"
                 + table(results))
    body += ("\n### planner vs lfu (the live default before this bench), est. ms / token\n\n"
             "| model, budget | uniform: lfu | planner | ratio | profile: lfu | planner | ratio |\n"
             "|---|---|---|---|---|---|---|\n")
    for what, r in summary:
        cells = [f"{r[i, 'lfu']['ms_per_token']:.1f} | {r[i, 'planner']['ms_per_token']:.1f} | "
                 f"{r[i, 'planner']['ms_per_token'] / r[i, 'lfu']['ms_per_token']:.3f}" for i in ("uniform", "profile")]
        body += f"| {what} | {' | '.join(cells)} |\n"
    update_section("replay-device-policies", "python -m bench.replay_device_policies", body)
    print(body)


if __name__ == "__main__":
    main()
