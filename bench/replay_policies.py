"""Cache policies replayed over real Mixtral-8x7B routing (Q4_K sizes, measured H100 host bandwidths).

Held out: each policy is fitted on one GSM8K problem and scored on the other, both ways; the table shows the
mean of the two folds. Static pinning is what llama.cpp does with experts split between GPU and CPU
(`--n-cpu-moe` / `-ot`), so it is the peer the planner's speed is compared with.
"""

from __future__ import annotations

import numpy as np

from bench import mixtral_routing as mx
from bench.report import update_section
from router_predict.predictors import chosen
from router_predict.replay import CacheConfig, CostModel, compare, slots_for_vram
from router_predict.trace import Trace

GIB = 2**30
H2D_BYTES_PER_S = 51 * GIB  # measured H100 host: pinned host -> GPU
CPU_BYTES_PER_S = 55 * GIB  # measured: host RAM read with 16 threads
DISK_BYTES_PER_S = 1.6e9  # measured NVMe
GPU_BYTES_PER_S = 2.0e12  # assumed: decode kernels reach ~60% of H100 HBM3's 3.35 TB/s
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


def main() -> None:
    trace = mx.load()
    eb = mx.expert_bytes(trace)
    cost = CostModel(H2D_BYTES_PER_S, CPU_BYTES_PER_S, DISK_BYTES_PER_S, GPU_BYTES_PER_S, mx.DENSE_LAYER_BYTES)
    body = (f"Mixtral-8x7B-Instruct routing on GSM8K ({trace.n_tokens} generated tokens, 32 layers, top-2 of 8), "
            f"Q4_K experts of {eb[0] / 2**20:.1f} MiB; held out (fit on one problem, score on the other, both "
            "ways; mean of the two folds). Hit rate: needed experts ready in VRAM when their layer ran. "
            "Static pinning is llama.cpp's placement (the peer). \"of Belady\" is against Belady with bypass (a "
            "miss used later than everything cached runs on the CPU), the hit-rate optimum of a cache that does "
            "not prefetch; Belady MIN must cache every miss. The planner's settings are tuned per fold on the "
            "fitting problem only (predictors fitted on its first half, settings scored by hit rate on its second "
            "half); among them how much later than a miss its victim must be expected back before the miss takes "
            "the slot (else it runs on the CPU). \"Oracle pinning\" pins the scored problem's own most-used "
            "experts: no online policy knows them, and without a sharper predictor of when an expert returns "
            "(these traces have no hidden states for gate lookahead) it is about the most that frequency can "
            "give; the planner comes near or past it only by prefetching into link time its CPU misses leave "
            "idle. The admission margin buys hit rate with time: a refused miss runs on the CPU, after any other "
            "in its step (checked while developing it, with no margin, every miss the link can take fetched: "
            "12 GiB 0.567 at 25.8 tokens/s, 16 GiB 0.719 at 35.5, 20 GiB 0.841 at 55.4; the tuning puts hit rate "
            "first). The same planner handed each expert's true next use reached 97-102% of Belady at every "
            "budget here (a check made before the admission margin, not a row below): what it lacks is "
            "prediction, and these two problems share little (their per-expert frequencies correlate at 0.45; an "
            "expert used at one token is used at the next with chance 0.34 against 0.25 for any). The same "
            "planner with its predictors fitted on the scored problem itself reaches 0.802 at 16 GiB and 0.897 at "
            "20 GiB (a development check: 8 layers ahead, admission 2x, the rest chosen on the scored problem): "
            "+5 at 20 GiB (0.857) lies above oracle pinning and within reach only of statistics that one "
            "problem's routing does not give for the other.\n")
    for vram in VRAM_GIB:
        slots = slots_for_vram(vram * GIB, RESERVED_BYTES, eb)
        cache = CacheConfig(1, slots)
        runs = [compare(fit, test, cost, cache, eb) for _, fit, test in mx.folds(trace)]
        belady = np.mean([r[-1].hit_rate for r in runs])
        pinned = np.mean([r[3].tokens_per_s for r in runs])
        body += (f"\n### {vram} GiB VRAM: {slots} slots for {eb.size} experts ({slots / eb.size:.0%})\n\n"
                 "| policy | hit rate | of Belady | GB moved / token | on CPU | est. tokens/s | vs pinning |\n"
                 "|---|---|---|---|---|---|---|\n")
        for i, r in enumerate(runs[0]):
            hit = np.mean([run[i].hit_rate for run in runs])
            gb = np.mean([run[i].h2d_bytes_per_token for run in runs]) / 1e9
            cpu = np.mean([run[i].cpu_share for run in runs])
            tps = np.mean([run[i].tokens_per_s for run in runs])
            names = {run[i].policy for run in runs}
            body += (f"| {' / '.join(sorted(names))} | {hit:.3f} | {hit / belady:.0%} | {gb:.2f} | {cpu:.0%} | "
                     f"{tps:.1f} | {tps / pinned:.2f}x |\n")
        hit = [np.mean([run[i].hit_rate for run in runs]) for i in range(len(runs[0]))]
        oracle = np.mean([oracle_pinning(test, slots) for _, _, test in mx.folds(trace)])
        body += f"\nOracle pinning: hit rate {oracle:.3f} ({oracle / belady:.0%} of Belady). " + \
            target_line(hit[4], hit[:3], belady)
    body += (f"\nCost model: host->GPU {H2D_BYTES_PER_S / GIB:.0f} GiB/s, CPU experts {CPU_BYTES_PER_S / GIB:.0f} "
             f"GiB/s, disk {DISK_BYTES_PER_S / 1e9:.1f} GB/s, GPU weight reads {GPU_BYTES_PER_S / 1e12:.1f} TB/s "
             "(assumed); one token per step (decode).\n")
    update_section("replay-policies", "python -m bench.replay_policies", body)
    print(body)


if __name__ == "__main__":
    main()
