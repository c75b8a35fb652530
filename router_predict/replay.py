"""Replay a routing trace through a cache policy and a cost model: hit rate, bytes moved, tokens per second.

Shape key: N tokens, L MoE layers, K experts per step, G GPUs, S slots per GPU, X = L*E experts.
Decode only: one token per layer step. A step lasts as long as the slowest of its GPU work, the copies it waits
for on the busiest link and its CPU experts. Misses run as moe-tier's decode runs them (planner.uncached): staged
through the link, evicting nothing, with the CPU computing its share of the same pinned bytes, or computed whole on
the CPU, whichever ends the step sooner. A miss a policy caches (FETCH) runs so too while its copy into the slot (a
promotion) goes on behind the step, unless waiting for that copy ends the step as soon (planner.not_ready); the
promotion is ready for the next step, and its link time is owed by the steps after (their copies queue behind it)
before any prefetch, first issued first, gets the idle rest. Both choices charge link time at the policy's
`link_value` (the planner's is tuned: link time left idle carries its prefetches). Either kind is a miss. CPU (static
pinning, the llama.cpp peer) runs whole on the CPU. Every bandwidth is an input: the runtime holds no machine
constants.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from router_predict.planner import BYPASS, CPU, FETCH, HIT, not_ready, uncached
from moe_tier.errors import MoeTierError
from router_predict.policies import LFRU, LFU, LRU, Belady, CacheState, Planner, PlannerSettings, StaticPinning
from router_predict.predictors import chosen
from router_predict.trace import Trace


@dataclass(frozen=True)
class CostModel:
    h2d_bytes_per_s: float  # pinned host memory -> one GPU, per link
    cpu_bytes_per_s: float  # expert weights the CPU streams through its matmul (host memory bound)
    disk_bytes_per_s: float  # cold tier reads
    gpu_bytes_per_s: float  # weights the GPU reads per second while computing
    dense_layer_bytes: int  # attention, norms and router weights of one layer
    stage_cpu_share: float = 0.0  # of a staged miss's bytes, what the CPU computes (tiers.links.balanced_share)

    def __post_init__(self):
        if min(self.h2d_bytes_per_s, self.cpu_bytes_per_s, self.disk_bytes_per_s, self.gpu_bytes_per_s) <= 0:
            raise ValueError("bandwidths must be positive")
        if not 0.0 <= self.stage_cpu_share < 1.0:
            raise ValueError("the CPU's share of a staged expert must be in [0, 1)")

    def gpu_s(self, expert_bytes: int) -> float:
        """GPU time of one layer step computing `expert_bytes` of experts."""
        return (self.dense_layer_bytes + expert_bytes) / self.gpu_bytes_per_s


@dataclass(frozen=True)
class CacheConfig:
    n_gpu: int
    slots_per_gpu: int
    host_bytes: int | None = None  # pinned host memory for experts; the rest stays on disk (None: all fit)


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    hit_rate: float  # needed experts ready in VRAM when their layer ran
    h2d_bytes_per_token: float  # demand, staging and prefetch copies, wasted prefetches included
    cpu_share: float  # needed experts computed whole on the CPU
    staged_share: float  # needed experts staged through the link (cached ones too, while their promotion runs)
    tokens_per_s: float
    prefetch_used: float  # share of finished prefetches that were used before eviction


def slots_for_vram(vram_bytes: int, reserved_bytes: int, expert_bytes: np.ndarray) -> int:
    """Expert slots that fit one GPU after `reserved_bytes` (dense weights, KV cache, activations)."""
    return max(int((vram_bytes - reserved_bytes) // int(expert_bytes.max())), 0)


def frequency_order(train: Trace) -> np.ndarray:
    """Flat expert ids, most used in `train` first (stable, so ties keep layer order)."""
    return np.argsort(-chosen(train).sum(0).ravel(), kind="stable")


def _uncached_stats(link_s: float, n_bytes: int, cost: CostModel) -> tuple[int, int, float]:
    """(staged, on the CPU, bytes over the link) of a miss `uncached` ran, from the link time it took."""
    if link_s > 0:
        return 1, 0, (1.0 - cost.stage_cpu_share) * n_bytes
    return 0, 1, 0.0


def replay(policy, test: Trace, train: Trace, cost: CostModel, cache: CacheConfig,
           expert_bytes: np.ndarray) -> ReplayResult:
    """Run `policy` over every token of `test`, its caches filled and fitted from `train` only."""
    order = frequency_order(train)
    on_disk = np.zeros(expert_bytes.shape[0], bool)
    if cache.host_bytes is not None:
        in_host = np.cumsum(expert_bytes[order]) <= cache.host_bytes
        on_disk[order[~in_host]] = True
    state = CacheState.preloaded(cache.n_gpu, cache.slots_per_gpu, order, expert_bytes, on_disk)
    policy.start(state, train)
    flat, weights = test.flat_ids(), test.weights
    queues = [deque() for _ in range(cache.n_gpu)]
    debt_s = np.zeros(cache.n_gpu)  # link time promotions still need after the step that started them
    S = cache.slots_per_gpu
    hits = cpu = staged = needed_total = 0
    moved_bytes = total_s = 0.0
    landed = set()
    used_prefetch = finished_prefetch = 0
    for t in range(test.n_tokens):
        fresh = t == 0 or test.sequence[t] != test.sequence[t - 1]
        for layer in range(test.n_moe_layers):
            needed = flat[t, layer]
            actions, prefetched = policy.step(layer, needed, weights[t, layer], state, fresh and layer == 0)
            link_s = debt_s.copy()  # this step's copies queue behind the promotions still running
            demand = np.zeros(cache.n_gpu, bool)  # links the step waits on
            promote_s = np.zeros(cache.n_gpu)  # copies into slots behind the step
            cpu_s = gpu_bytes = 0.0
            for x, a in zip(needed, actions):
                read_s = expert_bytes[x] / cost.disk_bytes_per_s if on_disk[x] else 0.0
                if a == HIT:
                    hits += 1
                    gpu_bytes += expert_bytes[x]
                    if x in landed:
                        used_prefetch += 1
                        landed.discard(x)
                elif a == FETCH:
                    g = state.expert_slot[x] // S
                    waits, add_link_s, add_cpu_s = not_ready(expert_bytes[x], state.remaining_bytes[x], read_s,
                                                             link_s[g], cpu_s, cost.h2d_bytes_per_s,
                                                             cost.cpu_bytes_per_s, cost.stage_cpu_share,
                                                             policy.link_value)
                    link_s[g] += add_link_s
                    cpu_s += add_cpu_s
                    demand[g] |= add_link_s > 0
                    moved_bytes += state.remaining_bytes[x]
                    if waits:
                        gpu_bytes += expert_bytes[x]
                    else:  # run uncached; its copy goes on behind the step and is ready for the next one
                        promote_s[g] += state.remaining_bytes[x] / cost.h2d_bytes_per_s
                        n_staged, n_cpu, moved = _uncached_stats(add_link_s, expert_bytes[x], cost)
                        staged, cpu, moved_bytes = staged + n_staged, cpu + n_cpu, moved_bytes + moved
                        gpu_bytes += expert_bytes[x] * n_staged
                    state.remaining_bytes[x] = 0
                elif a == CPU:
                    cpu += 1
                    cpu_s += read_s + expert_bytes[x] / cost.cpu_bytes_per_s
                elif a != BYPASS:
                    raise AssertionError(f"{policy.name}: no action for expert {x}")
            for x in needed[actions == BYPASS]:  # after the step's demand copies, which the link serves too
                read_s = expert_bytes[x] / cost.disk_bytes_per_s if on_disk[x] else 0.0
                g = int(np.argmin(link_s))
                _, add_link_s, add_cpu_s = uncached(expert_bytes[x], read_s, link_s[g], cpu_s, cost.h2d_bytes_per_s,
                                                    cost.cpu_bytes_per_s, cost.stage_cpu_share, policy.link_value)
                link_s[g] += add_link_s
                cpu_s += add_cpu_s
                demand[g] |= add_link_s > 0
                n_staged, n_cpu, moved = _uncached_stats(add_link_s, expert_bytes[x], cost)
                staged, cpu, moved_bytes = staged + n_staged, cpu + n_cpu, moved_bytes + moved
                gpu_bytes += expert_bytes[x] * n_staged
            needed_total += len(needed)
            step_s = max(cost.gpu_s(gpu_bytes), link_s[demand].max(initial=0.0), cpu_s)
            link_s += promote_s
            debt_s = np.maximum(link_s - step_s, 0.0)
            total_s += step_s
            for x in prefetched:
                g = state.expert_slot[x] // S
                queues[g].append(int(x))
                state.queued_bytes[g] += state.remaining_bytes[x]
            for g, queue in enumerate(queues):  # prefetches use the link time demand copies left idle
                budget = (step_s - link_s[g]) * cost.h2d_bytes_per_s  # none while promotions run on
                while queue and budget > 0:
                    x = queue[0]
                    if state.expert_slot[x] < 0 or state.expert_slot[x] // S != g or not state.remaining_bytes[x]:
                        queue.popleft()  # cancelled by an eviction, or finished by a demand copy
                        continue
                    step_bytes = min(state.remaining_bytes[x], budget)
                    state.remaining_bytes[x] -= step_bytes
                    moved_bytes += step_bytes
                    budget -= step_bytes
                    if state.remaining_bytes[x] == 0:
                        queue.popleft()
                        landed.add(x)
                        finished_prefetch += 1
                state.queued_bytes[g] = debt_s[g] * cost.h2d_bytes_per_s + sum(
                    state.remaining_bytes[x] for x in queue if state.expert_slot[x] // S == g)
            landed = {x for x in landed if state.expert_slot[x] >= 0}  # evicted unused: a wasted prefetch
    n = max(test.n_tokens, 1)
    return ReplayResult(policy.name, hits / max(needed_total, 1), moved_bytes / n, cpu / max(needed_total, 1),
                        staged / max(needed_total, 1), n / total_s if total_s else float("inf"),
                        used_prefetch / finished_prefetch if finished_prefetch else float("nan"))


def holdout(trace: Trace, fit_share: float = 0.5) -> tuple[Trace, Trace]:
    """Split by whole sequences: the first `fit_share` of them to fit, the rest to score."""
    seqs = trace.sequences()
    if len(seqs) < 2:
        raise MoeTierError(trace.source, "held-out replay needs two or more sequences (or separate fit traces)")
    n_fit = min(max(int(round(len(seqs) * fit_share)), 1), len(seqs) - 1)
    fit_mask = np.isin(trace.sequence, seqs[:n_fit])
    return trace.select(fit_mask), trace.select(~fit_mask)


LFRU_HALF_LIVES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def fit_lfru(train: Trace, cost: CostModel, cache: CacheConfig, expert_bytes: np.ndarray) -> LFRU:
    """LFRU with the half-life (in tokens) that gives the best hit rate replaying the fitting traces."""
    best = max(LFRU_HALF_LIVES, key=lambda h: replay(LFRU(h), train, train, cost, cache, expert_bytes).hit_rate)
    return LFRU(best)


PLANNER_GRID = [PlannerSettings(recency_weight=r, half_life_tokens=h, online_weight=w)
                for r in (0.3, 0.6, 0.9) for h in (4.0, 8.0, 32.0) for w in (0.2, 0.5)] + \
    [PlannerSettings(fitted_visits=True, visit_horizon_tokens=h) for h in (1.0, 2.0, 4.0, 8.0)]
LOOKAHEAD_WEIGHTS = (0.5, 0.8, 1.0)
NEXT_TOKEN_WEIGHTS = (0.0, 0.2, 0.3, 0.5)
ADMIT_MARGINS = (1.0, 1.5, 2.0, 3.0)
LINK_VALUES = (0.0, 1.0, 2.0)
MAX_DISTANCES = (4, 8)


def tuning_split(train: Trace) -> np.ndarray:
    """(N,) mask of the fitting tokens that fit the predictors while settings are tuned on the rest: whole
    sequences where there are two or more, else the first half of the one sequence."""
    if len(train.sequences()) >= 2:
        return np.isin(train.sequence, holdout(train)[0].sequences())
    return np.arange(train.n_tokens) < train.n_tokens // 2


# What the planner's settings are tuned for, first and then to break ties: the hit rate (issue 5's measure) or the
# estimated tokens/s. They disagree: caching more misses raises the hit rate and takes link time a step could use.
OBJECTIVES = {"hit-rate": lambda r: (r.hit_rate, r.tokens_per_s), "speed": lambda r: (r.tokens_per_s, r.hit_rate)}


def fit_planner(train: Trace, cost: CostModel, cache: CacheConfig, expert_bytes: np.ndarray,
                lookahead: np.ndarray | None = None, next_token: np.ndarray | None = None,
                objective: str = "hit-rate") -> Planner:
    """The planner settings (recency vs frequency, how sure a miss must be to evict and what the link time misses
    take is worth to prefetches, the two tuned together as both decide the link time left idle, how many of this
    token's layers ahead get predictions and prefetches, how much to trust gate lookahead) best by `objective`
    (OBJECTIVES) on fitting tokens its predictors were not fitted on (`tuning_split`): which wins depends on the
    model, and tuning on the predictors' own tokens would favour trusting them.
    `lookahead` (N, L, D, E) and `next_token` (N, L, E): gate lookahead for the fitting tokens (this token's next
    layers, the next token's), from lookaheads not fitted on them."""
    inner = tuning_split(train)
    fit, tune = train.select(inner), train.select(~inner)

    def score(settings: PlannerSettings) -> tuple[float, float]:
        planner = Planner(cost, settings, None if lookahead is None else lookahead[~inner],
                          None if next_token is None else next_token[~inner])
        return OBJECTIVES[objective](replay(planner, tune, fit, cost, cache, expert_bytes))

    best = max(PLANNER_GRID, key=score)
    best = max([replace(best, admit_margin=m, link_value=v) for m in ADMIT_MARGINS for v in LINK_VALUES], key=score)
    best = max([replace(best, max_distance=d) for d in MAX_DISTANCES], key=score)
    if lookahead is not None:  # then how much to trust it, the rest fixed
        best = max([replace(best, lookahead_weight=w) for w in LOOKAHEAD_WEIGHTS], key=score)
    if next_token is not None:
        best = max([replace(best, next_token_weight=w) for w in NEXT_TOKEN_WEIGHTS], key=score)
    return Planner(cost, best)


def fitted_policies(train: Trace, test: Trace, cost: CostModel, cache: CacheConfig, expert_bytes: np.ndarray,
                    objective: str = "hit-rate") -> list:
    """Every policy fitted on `train`: LRU, LFU, LFRU, pinning, the planner (tuned for `objective`), Belady's MIN
    and Belady with bypass (the hit-rate optimum, last; both read `test`)."""
    return [LRU(), LFU(), fit_lfru(train, cost, cache, expert_bytes), StaticPinning(),
            fit_planner(train, cost, cache, expert_bytes, objective=objective), Belady(test, allow_bypass=False),
            Belady(test)]


def compare(train: Trace, test: Trace, cost: CostModel, cache: CacheConfig, expert_bytes: np.ndarray,
            objective: str = "hit-rate") -> list[ReplayResult]:
    """`fitted_policies` scored on `test`."""
    return [replay(p, test, train, cost, cache, expert_bytes)
            for p in fitted_policies(train, test, cost, cache, expert_bytes, objective)]
