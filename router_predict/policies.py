"""Expert cache policies over one slot table: LRU, LFU, LFRU, static frequency pinning, Belady, the planner.

Shape key: G GPUs, S slots per GPU, X = L*E experts (flat id `layer * E + expert`), K experts per step.
A policy sees one layer step at a time and answers, for each needed expert, HIT (ready in a slot), FETCH
(copied to a slot now, evicting the policy's choice), BYPASS (not cached: the cost model stages it or runs it on the
CPU, planner.uncached) or CPU (computed on the CPU, as llama.cpp runs the experts it does not offload).
Only the planner also prefetches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from router_predict.next_visit import DECAY, HALF_LIVES_TOKENS, NextVisit
from router_predict.online import update
from router_predict.planner import BYPASS, CPU, FETCH, HIT, plan_step
from router_predict.predictors import MAX_DISTANCE, Combined, chosen
from router_predict.trace import Trace

if TYPE_CHECKING:
    from router_predict.replay import CostModel


@dataclass(eq=False)
class CacheState:
    """Where every expert lives: the GPU slot table and bytes still in flight to each slot."""

    slot_expert: np.ndarray  # (G, S) int32 flat expert id in each slot, -1 free
    expert_slot: np.ndarray  # (X,) int32 flat slot g*S+s holding the expert, -1 in host memory or on disk
    remaining_bytes: np.ndarray  # (X,) int64 bytes of a transfer still under way, 0 when ready
    expert_bytes: np.ndarray  # (X,) int64
    on_disk: np.ndarray  # (X,) bool cold tier (else pinned host memory)
    queued_bytes: np.ndarray  # (G,) float prefetch bytes still queued on each GPU's link

    @classmethod
    def preloaded(cls, n_gpu: int, slots_per_gpu: int, order: np.ndarray, expert_bytes: np.ndarray,
                  on_disk: np.ndarray) -> "CacheState":
        """Slots filled, ready, with the first experts of `order` (the most used in the fitting traces)."""
        X = expert_bytes.shape[0]
        state = cls(np.full((n_gpu, slots_per_gpu), -1, np.int32), np.full(X, -1, np.int32),
                    np.zeros(X, np.int64), expert_bytes.astype(np.int64), on_disk.astype(bool), np.zeros(n_gpu))
        for c, x in enumerate(order[: n_gpu * slots_per_gpu]):
            state.slot_expert.flat[c] = x
            state.expert_slot[x] = c
        return state

    def ready(self, x: int) -> bool:
        return bool(self.expert_slot[x] >= 0 and self.remaining_bytes[x] == 0)

    def place(self, x: int, c: int) -> int:
        """Put x in slot c (evicting its occupant, returned or -1); the copy starts now."""
        old = int(self.slot_expert.flat[c])
        if old >= 0:
            self.expert_slot[old] = -1
            self.remaining_bytes[old] = 0
        self.slot_expert.flat[c] = x
        self.expert_slot[x] = c
        self.remaining_bytes[x] = self.expert_bytes[x]
        return old

    def check(self) -> None:
        """Every expert is in at most one slot and the two tables agree."""
        flat = self.slot_expert.ravel()
        used = flat[flat >= 0]
        assert len(np.unique(used)) == len(used), "an expert occupies two slots"
        assert np.array_equal(np.flatnonzero(self.expert_slot >= 0), np.sort(used)), "slot tables disagree"
        assert (flat[self.expert_slot[used]] == used).all(), "slot tables disagree"
        assert (self.remaining_bytes[self.expert_slot < 0] == 0).all(), "transfer to no slot"


class DemandPolicy:
    """Fetch every miss into the slot of the least worth-keeping expert; subclasses define `keep`."""

    name = "demand"
    link_value = 0.0  # how its misses run prices link time at nothing (planner.uncached): no prefetches want it

    def start(self, state: CacheState, train: Trace) -> None:
        self.clock = 0

    def keep(self, xs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def touch(self, needed: np.ndarray) -> None:
        pass

    def bypass(self, x: int, victim: int) -> bool:
        return False

    def step(self, layer: int, needed: np.ndarray, weights: np.ndarray, state: CacheState, fresh: bool):
        """Actions (K,) for the experts `needed` (K,) by `layer`, and the experts whose prefetch started.
        `fresh`: the first layer of a new sequence's first token."""
        actions = np.empty(needed.shape[0], np.int8)
        for i, x in enumerate(needed):
            if state.ready(x):
                actions[i] = HIT
                continue
            flat = state.slot_expert.ravel()
            free = np.flatnonzero(flat < 0)
            if free.size:
                c = int(free[0])
            else:
                candidates = np.flatnonzero(~np.isin(flat, needed))
                c = int(candidates[np.argmin(self.keep(flat[candidates]))]) if candidates.size else -1
            if c < 0 or (flat[c] >= 0 and self.bypass(int(x), int(flat[c]))):
                actions[i] = BYPASS
            else:
                state.place(int(x), c)
                actions[i] = FETCH
        self.touch(needed)
        self.clock += 1
        return actions, ()


class LRU(DemandPolicy):
    name = "LRU"

    def start(self, state, train):
        super().start(state, train)
        self.last = np.full(state.expert_bytes.shape[0], -1.0)
        resident = state.slot_expert.ravel()
        # preloaded most-used first: rank them as if the most used were the most recent
        self.last[resident[resident >= 0]] = -1.0 - np.arange((resident >= 0).sum()) * 1e-6

    def keep(self, xs):
        return self.last[xs]

    def touch(self, needed):
        self.last[needed] = self.clock


class LFU(LRU):
    """Counts every use since the start (ties go to the more recent)."""

    name = "LFU"

    def start(self, state, train):
        super().start(state, train)
        self.count = np.zeros(state.expert_bytes.shape[0])

    def keep(self, xs):
        return self.count[xs] + self.last[xs] / (self.clock + 2.0) * 1e-3

    def touch(self, needed):
        super().touch(needed)
        self.count[needed] += 1


class LFRU(LRU):
    """Frequency with exponential forgetting (the CRF of LRFU): each use counts 2^(-age / half_life)."""

    def __init__(self, half_life_tokens: float = 8.0):
        self.half_life_tokens = half_life_tokens
        self.name = f"LFRU (half-life {half_life_tokens:g} tokens)"

    def start(self, state, train):
        super().start(state, train)
        self.half_life_steps = self.half_life_tokens * train.n_moe_layers
        self.crf = np.zeros(state.expert_bytes.shape[0])

    def keep(self, xs):
        return self.crf[xs] * np.exp2(-(self.clock - self.last[xs]) / self.half_life_steps)

    def touch(self, needed):
        self.crf[needed] = self.keep(needed) + 1.0
        super().touch(needed)


class StaticPinning(DemandPolicy):
    """The experts used most in the fitting traces stay in VRAM; everything else runs on the CPU, as llama.cpp runs
    the experts it keeps in host memory (`--n-cpu-moe`, `-ot`) at decode: the peer, not moe-tier's decode."""

    name = "static pinning"

    def step(self, layer, needed, weights, state, fresh):
        return np.array([HIT if state.ready(x) else CPU for x in needed], np.int8), ()


class Belady(DemandPolicy):
    """The offline optimum: evict the expert used furthest in the future, and bypass a miss used later still
    (not cached). Without bypass it is the classic MIN, the optimum when every miss must be cached."""

    def __init__(self, test: Trace, allow_bypass: bool = True):
        self.allow_bypass = allow_bypass
        self.name = "Belady (oracle)" if allow_bypass else "Belady MIN (oracle, every miss cached)"
        flat = test.flat_ids().reshape(-1, test.n_expert_used)  # (steps, K)
        X = test.n_moe_layers * test.n_expert
        self.next_after = np.full(flat.shape, np.iinfo(np.int64).max, np.int64)  # next step using the same x
        upcoming = np.full(X, np.iinfo(np.int64).max, np.int64)
        for s in range(flat.shape[0] - 1, -1, -1):
            self.next_after[s] = upcoming[flat[s]]
            upcoming[flat[s]] = s
        self.first = upcoming

    def start(self, state, train):
        super().start(state, train)
        self.next_use = self.first.copy()

    def keep(self, xs):
        return -self.next_use[xs]

    def bypass(self, x, victim):
        after = self.next_after[self.clock][np.flatnonzero(self._needed == x)[0]]
        return self.allow_bypass and after > self.next_use[victim]

    def step(self, layer, needed, weights, state, fresh):
        self._needed = needed
        return super().step(layer, needed, weights, state, fresh)

    def touch(self, needed):
        self.next_use[needed] = self.next_after[self.clock]


@dataclass(frozen=True)
class PlannerSettings:
    max_prefetch: int = 8  # prefetches started per step at most
    max_distance: int = MAX_DISTANCE  # layers ahead that get predictions
    queue_steps: float = 1.0  # steps of idle link time the prefetch queue may hold
    online_weight: float = 0.5  # in the next-visit prediction: running frequency vs token reuse
    recency_weight: float = 0.3  # ... and uses with exponential forgetting vs both
    half_life_tokens: float = 8.0
    admit_margin: float = 1.0  # a miss evicts only an expert expected back this many times later than itself
    link_value: float = 0.0  # step seconds a miss's second of link is charged (planner.uncached, not_ready)
    lookahead_weight: float = 0.7  # gate lookahead vs the fitted predictors, where the engine provides it
    fitted_visits: bool = False  # next visits from the least-squares NextVisit instead of the three weights above
    visit_horizon_tokens: float = 1.0  # NextVisit's target: uses over about this many tokens (1: the next only)
    next_token_weight: float = 0.0  # the next token's gate lookahead vs the above, where the engine provides it

    def __str__(self) -> str:
        visits = f"fitted next visit over {self.visit_horizon_tokens:g} tokens" if self.fitted_visits else \
            f"recency {self.recency_weight:g} / {self.half_life_tokens:g} tokens, frequency {self.online_weight:g}"
        return (f"{visits}, admit {self.admit_margin:g}x, link value {self.link_value:g}, "
                f"{self.max_distance} layers ahead")


class Planner:
    """Predictions from the fitted Combined predictor, decisions from the compiled `plan_step`.

    `recent` (L, E) predicts each layer's next visit: token reuse from the layer's latest routing and the
    expert frequencies (which keep counting through the replayed tokens), mixed with the uses of the last
    few tokens (exponential forgetting), by the settings' weights or by `NextVisit`'s fitted ones.
    `lookahead` (N, L, D, E), when the engine recorded it: gate lookahead probabilities for each replayed
    token and layer (`lookahead.FittedLookahead`). `next_token` (N, L, E): the same for the next token's routing
    at each layer, from this token's state there; it sharpens the next visit, which ranks evictions.
    """

    def __init__(self, cost: "CostModel", settings: PlannerSettings = PlannerSettings(),
                 lookahead: np.ndarray | None = None, next_token: np.ndarray | None = None):
        self.cost, self.s, self.lookahead, self.next_token = cost, settings, lookahead, next_token
        self.decay = 0.5 ** (1.0 / settings.half_life_tokens)
        look = f" + gate lookahead {settings.lookahead_weight:g}" if lookahead is not None else ""
        look += f" + next token {settings.next_token_weight:g}" if next_token is not None else ""
        self.name = f"planner{look} ({settings})"
        self.link_value = settings.link_value

    def start(self, state: CacheState, train: Trace) -> None:
        self.model = Combined.fit(train, self.s.max_distance)
        self.E = train.n_expert
        self.recent = self.model.prior.prob.astype(np.float32).copy()  # (L, E)
        self.ahead = np.zeros((self.s.max_distance, self.E), np.float32)
        self.prefetch = np.zeros(self.s.max_prefetch, np.int64)
        self.counts = chosen(train).sum(0) + 1.0  # (L, E) uses so far, the replayed tokens included
        self.decayed = self.model.prior.prob.copy()  # (L, E) uses with exponential forgetting
        # (H, L, E) forgetting counts and (F,) weights of the fitted next visit; empty for the mixture
        self.forgetting = np.repeat(self.model.prior.prob[None], len(HALF_LIVES_TOKENS), 0)
        self.visit_weights = NextVisit.fit(train, self.model.prior, self.model.reuse,
                                           self.s.visit_horizon_tokens).weights if self.s.fitted_visits else np.zeros(0)
        self.no_gate = np.zeros((0, self.E), np.float32)
        self.token = -1

    def step(self, layer, needed, weights, state, fresh):
        if fresh:
            self.recent[:] = self.model.prior.prob
            self.forgetting[:] = self.model.prior.prob
        self.token += layer == 0
        gate = self.no_gate
        if self.lookahead is not None:
            gate = self.lookahead[self.token, layer, : min(self.s.max_distance, self.recent.shape[0] - 1 - layer)]
        next_gate = self.no_gate[:, 0] if self.next_token is None else self.next_token[self.token, layer]
        m = self.model
        update(layer, (needed % self.E).astype(np.int64), weights / max(weights.sum(), 1e-12), m.prior.prob,
               m.cross.table, m.mix, m.reuse.table, gate, self.s.lookahead_weight, next_gate,
               self.s.next_token_weight, self.counts, self.decayed, self.decay, self.s.online_weight,
               self.s.recency_weight, self.visit_weights, self.forgetting, DECAY, self.recent, self.ahead)
        actions = np.empty(needed.shape[0], np.int8)
        c = self.cost
        n = plan_step(layer, needed.astype(np.int64), self.ahead, self.recent, state.slot_expert,
                      state.expert_slot, state.remaining_bytes, state.on_disk, state.expert_bytes,
                      c.h2d_bytes_per_s, c.cpu_bytes_per_s, c.disk_bytes_per_s, c.stage_cpu_share,
                      c.gpu_s(int(state.expert_bytes[needed].sum())), state.queued_bytes / c.h2d_bytes_per_s,
                      self.s.queue_steps, self.s.admit_margin, self.s.link_value, actions, self.prefetch)
        return actions, self.prefetch[:n]
