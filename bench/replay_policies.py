"""Cache policies replayed over real Mixtral-8x7B routing (Q4_K sizes, measured H100 host bandwidths).

Held out: each policy is fitted on one GSM8K problem and scored on the other, both ways; the table shows the
mean of the two folds. Static pinning is what llama.cpp does with experts split between GPU and CPU
(`--n-cpu-moe` / `-ot`), so it is the peer the planner's speed is compared with.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench import mixtral_routing as mx
from bench.report import update_section
from moe_tier.tiers.links import balanced_share
from router_predict.policies import Planner
from router_predict.predictors import chosen
from router_predict.replay import ADMIT_MARGINS, CacheConfig, CostModel, fitted_policies, replay, slots_for_vram
from router_predict.trace import Trace

GIB = 2**30
H2D_BYTES_PER_S = 51 * GIB  # measured H100 host: pinned host -> GPU
CPU_BYTES_PER_S = 55 * GIB  # measured: host RAM read with 16 threads
DISK_BYTES_PER_S = 1.6e9  # measured NVMe
GPU_BYTES_PER_S = 2.0e12  # assumed: decode kernels reach ~60% of H100 HBM3's 3.35 TB/s
STAGE_CPU_SHARE = balanced_share(CPU_BYTES_PER_S, H2D_BYTES_PER_S)  # the CPU's part of a staged miss, as decode sets it
COST = CostModel(H2D_BYTES_PER_S, CPU_BYTES_PER_S, DISK_BYTES_PER_S, GPU_BYTES_PER_S, mx.DENSE_LAYER_BYTES,
                 STAGE_CPU_SHARE)
RESERVED_BYTES = 32 * mx.DENSE_LAYER_BYTES + 2 * GIB  # dense layers, output head, KV cache, runtime
VRAM_GIB = (12, 16, 20)


def oracle_pinning(test: Trace, slots: int) -> float:
    """Hit rate of pinning the `slots` experts that `test` itself uses most (a bound for frequency alone)."""
    uses = np.sort(chosen(test).sum(0).ravel())[::-1]
    return float(uses[:slots].sum() / uses.sum())


def target_line(planner: float, baselines: list[float], belady: float) -> str:
    """Issue 5's target for one budget: the planner's hit rate at least the best of LRU/LFU/LFRU plus 5 points
    and at least 85% of Belady's."""
    ahead, share = planner - max(baselines), planner / belady
    met = "met" if ahead >= 0.05 and share >= 0.85 else "not met"
    if max(baselines) + 0.05 > belady:
        met += f" (+5 is out of reach here: it needs {max(baselines) + 0.05:.3f}, above Belady's optimum)"
    return (f"Target: the planner {100 * ahead:+.1f} points against the best of LRU/LFU/LFRU (needs +5) and "
            f"{share:.1%} of Belady (needs 85%): {met}.\n")


def at_margins(planner: Planner) -> list[Planner]:
    """The same planner at each admission margin the tuning tries, the rest of its settings as tuned."""
    return [Planner(planner.cost, replace(planner.s, admit_margin=m), planner.lookahead, planner.next_token)
            for m in ADMIT_MARGINS]


def margin_line(runs: list[list]) -> str:
    """Hit rate and tokens/s at each margin, `runs` (folds, margins) of results averaged over the folds."""
    cells = [f"{m:g}x {np.mean([r[i].hit_rate for r in runs]):.3f} at {np.mean([r[i].tokens_per_s for r in runs]):.1f}"
             for i, m in enumerate(ADMIT_MARGINS)]
    return "The tuned planner at each admission margin (hit rate at tokens/s): " + ", ".join(cells) + ". "


def scored(train: Trace, test: Trace, cache: CacheConfig, eb: np.ndarray) -> tuple[list, list]:
    """`fitted_policies`' results, and the planner's at each admission margin."""
    policies = fitted_policies(train, test, COST, cache, eb)
    return ([replay(p, test, train, COST, cache, eb) for p in policies],
            [replay(p, test, train, COST, cache, eb) for p in at_margins(policies[4])])


def main() -> None:
    trace = mx.load()
    eb = mx.expert_bytes(trace)
    body = (f"Mixtral-8x7B-Instruct routing on GSM8K ({trace.n_tokens} generated tokens, 32 layers, top-2 of 8), "
            f"Q4_K experts of {eb[0] / 2**20:.1f} MiB; held out (fit on one problem, score on the other, both "
            "ways; mean of the two folds). Hit rate: needed experts ready in VRAM when their layer ran. "
            "Misses run as moe-tier's decode runs them (router_predict/replay.py): staged, i.e. copied into a "
            "staging slot that evicts nothing while the CPU computes its share of the same pinned bytes (the "
            "share links.balanced_share sets, so both finish after bytes / (link + CPU rate)), or computed "
            "whole on the CPU where that ends the step sooner (the link busy); \"staged\" and \"on CPU\" count "
            "them. A miss a policy caches is staged too (never run whole on the CPU: its bytes cross the link "
            "anyway) and copied into its slot behind the step (decode promotes by a copy nothing waits for), taking "
            "link time from later steps and prefetches; it counts as ready for the next token. Static pinning is llama.cpp's placement (the peer): its misses run whole on the "
            "CPU, as llama.cpp runs the experts it leaves in host RAM, not by moe-tier's rule. \"of Belady\" is "
            "against Belady with bypass (a miss used later than everything cached is not cached), the hit-rate "
            "optimum of a cache that does not prefetch; Belady MIN must cache every miss. The planner's settings "
            "are tuned per fold on the fitting problem only (predictors fitted on its first half, settings scored "
            "by hit rate on its second half, tokens/s breaking ties); among them, tuned together, how much later than "
            "a miss its victim must be expected back before the miss takes the slot (the admission margin) and "
            "the link value: the step seconds each second of link a miss takes is charged (0, 1 or 2), so that a "
            "refused miss may run whole on the CPU, and a cached one wait for its copy (the read-back path) instead "
            "of being staged and then promoted, where staging would end its step only a little sooner, leaving "
            "the link to prefetches. The step still lasts as long as the path taken, so tokens/s stays honest; "
            "the baselines' link value is 0 (they have no prefetches). Tuned for hit rate, the planner stages no miss (its "
            "\"staged\" column): it takes the read-back path's choices, which decode's device path, staging every "
            "warm miss, does not offer today. The margin line gives the tuned planner "
            "at each admission margin, its link value as tuned. Tuned by tokens/s instead (a development check, "
            "hit rate breaking ties) the planner took link value 0 and a 1.5-2x margin and ran 33.5, 48.1 and "
            "77.2 tokens/s at 12, 16 and 20 GiB (1.99x, 1.99x and 1.87x pinning) at hit rates 0.483, 0.659 and "
            "0.814. Before the link value (every miss by whichever path ended its step sooner) the hit-rate "
            "tuning picked 1x and reached 0.515, 0.679 and 0.826 at 19.7, 25.3 and 40.0 tokens/s; before this cost "
            "model (a miss not cached ran whole on the CPU, after the step's other CPU misses, and a cached one "
            "was copied before it ran) 0.595, 0.729 and 0.844 at 22.6, 33.0 and 53.6 tokens/s. \"Oracle pinning\" pins the scored problem's own most-used "
            "experts: no online policy knows them, and without a sharper predictor of when an expert returns "
            "(these traces have no hidden states for gate lookahead) it is about the most that frequency can "
            "give. Under the earlier cost model the same planner handed each expert's true next use reached "
            "97-102% of Belady at every budget (what it lacks is prediction: these two problems share little, "
            "their per-expert frequencies correlate at 0.45; an expert used at one token is used at the next with "
            "chance 0.34 against 0.25 for any).\n")
    for vram in VRAM_GIB:
        slots = slots_for_vram(vram * GIB, RESERVED_BYTES, eb)
        cache = CacheConfig(1, slots)
        runs, margins = zip(*[scored(fit, test, cache, eb) for _, fit, test in mx.folds(trace)])
        belady = np.mean([r[-1].hit_rate for r in runs])
        pinned = np.mean([r[3].tokens_per_s for r in runs])
        body += (f"\n### {vram} GiB VRAM: {slots} slots for {eb.size} experts ({slots / eb.size:.0%})\n\n"
                 "| policy | hit rate | of Belady | GB moved / token | staged | on CPU | est. tokens/s | vs pinning |\n"
                 "|---|---|---|---|---|---|---|---|\n")
        for i, r in enumerate(runs[0]):
            hit = np.mean([run[i].hit_rate for run in runs])
            gb = np.mean([run[i].h2d_bytes_per_token for run in runs]) / 1e9
            staged = np.mean([run[i].staged_share for run in runs])
            cpu = np.mean([run[i].cpu_share for run in runs])
            tps = np.mean([run[i].tokens_per_s for run in runs])
            names = {run[i].policy for run in runs}
            body += (f"| {' / '.join(sorted(names))} | {hit:.3f} | {hit / belady:.0%} | {gb:.2f} | {staged:.0%} | {cpu:.0%} | "
                     f"{tps:.1f} | {tps / pinned:.2f}x |\n")
        hit = [np.mean([run[i].hit_rate for run in runs]) for i in range(len(runs[0]))]
        oracle = np.mean([oracle_pinning(test, slots) for _, _, test in mx.folds(trace)])
        body += f"\nOracle pinning: hit rate {oracle:.3f} ({oracle / belady:.0%} of Belady). " + \
            margin_line(margins) + target_line(hit[4], hit[:3], belady)
    body += (f"\nCost model: host->GPU {H2D_BYTES_PER_S / GIB:.0f} GiB/s, CPU experts {CPU_BYTES_PER_S / GIB:.0f} "
             f"GiB/s (a staged miss's CPU share {STAGE_CPU_SHARE:.0%}), disk {DISK_BYTES_PER_S / 1e9:.1f} GB/s, GPU weight reads {GPU_BYTES_PER_S / 1e12:.1f} TB/s "
             "(assumed); one token per step (decode).\n")
    update_section("replay-policies", "python -m bench.replay_policies", body)
    print(body)


if __name__ == "__main__":
    main()
