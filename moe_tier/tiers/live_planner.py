"""router_predict's planner on the GPU tiers' hot path: one compiled `plan_step` per MoE layer step decides the
hits, which misses take a slot (and whose), which run uncached, and what to prefetch into which GPU's slot.

Shape key: G GPUs, S the most slots one GPU has, L MoE layers, E experts per layer, X = L * E experts (flat id
`position * E + expert`, position = the layer's index among the MoE layers), K experts routed now, D layers ahead.
The planner's slot table (router_predict.policies.CacheState: slot_expert (G, S), expert_slot (X,),
remaining_bytes (X,) of copies under way) mirrors tiers.slots.SlotTable, the table the engine reads: every
change the planner makes is applied to both here, and check() compares them. A GPU with fewer than S slots
pads its row with planner.NO_SLOT.
Predictions come from router_predict's online update, as in the replay, from what the engine has: a routing
profile's chance of use per token (TierConfig.prior) seeds the running frequency as PROFILE_TOKENS tokens of
counts; with no trace there is no token-reuse table or cross-layer transition, so the next visit is the running
frequency mixed with the uses of the last few tokens, and a layer ahead of this one is predicted by its next visit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from moe_tier.reader import ExpertId
from moe_tier.tiers.links import LinkSpeeds
from moe_tier.tiers.slots import Slot, SlotTable
from router_predict.next_visit import DECAY, HALF_LIVES_TOKENS
from router_predict.online import update
from router_predict.planner import FETCH, HIT, NO_SLOT, plan_step
from router_predict.policies import CacheState, PlannerSettings

# The replay's tuned settings (BENCHMARKS.md replay-policies, replay.fit_planner, hit-rate objective), Mixtral-8x7B
# at 16 GiB: link value 2, 8 layers ahead. The replay mixed in token reuse (online_weight 0.2); live there is no
# reuse table, so the running frequency stands for both (1.0). Admission and recency were retuned on the device
# path (bench.replay_device_policies, fitting parts replayed, prefetches off): with the replay's admit 3x / recency
# 0.3 over 4 tokens a miss almost never took a slot (Mixtral 24 GiB, uniform slots: hit 0.896 against LFU's
# 0.932); admit 1.5x with recency 0.4 over 10 tokens hit 0.933 copying 43 MB a token (LFU 51), 0.472 / 92 MB at
# 12 GiB (LFU 0.474 / 115), and led LFU on the demo traces (0.465 / 0.713 / 0.890 against 0.326 / 0.599 / 0.825).
# Admit 1.0-1.25x or recency 0.5 churned (up to 1.9 GB a token at 12 GiB).
LIVE_SETTINGS = PlannerSettings(online_weight=1.0, recency_weight=0.4, half_life_tokens=10.0, admit_margin=1.5,
                                link_value=2.0, max_distance=8)
PROFILE_TOKENS = 256.0  # tokens' worth of counts a profile's frequencies start with, against the decoded ones
STEP_EMA = 0.1  # weight of the latest layer step's measured time in the running estimate


@dataclass
class StepPlan:
    """What one layer step does with its experts; slots already updated in the SlotTable."""
    hits: list[ExpertId] = field(default_factory=list)  # ready in a slot
    waits: list[ExpertId] = field(default_factory=list)  # in a slot whose copy is under way (a prefetch)
    placed: list[tuple[ExpertId, Slot]] = field(default_factory=list)  # misses given a slot now: copy them in
    uncached: list[ExpertId] = field(default_factory=list)  # misses left where they are (CPU, or staged)
    prefetch: list[tuple[ExpertId, Slot]] = field(default_factory=list)  # copies nothing waits for
    evicted: list[tuple[ExpertId, Slot]] = field(default_factory=list)  # the slots they left


class LivePlanner:
    def __init__(self, experts: Mapping[ExpertId, int], moe_layers: list[int], n_expert: int, n_expert_used: int,
                 table: SlotTable, prior: Mapping[ExpertId, float] | None = None,
                 settings: PlannerSettings = LIVE_SETTINGS):
        """experts: every routed expert's blob bytes; table: the slots as the engine holds them now."""
        self.table, self.s = table, settings
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.moe_layers, self.E, self.K = list(moe_layers), n_expert, n_expert_used
        L, E, D = len(moe_layers), n_expert, settings.max_distance
        self.gpus = sorted(table.n_slots)
        self.row = {gpu: g for g, gpu in enumerate(self.gpus)}
        S = max(table.n_slots.values(), default=0)
        expert_bytes = np.zeros(L * E, np.int64)
        for eid, n_bytes in experts.items():
            expert_bytes[self.flat(eid)] = n_bytes
        on_disk = np.ones(L * E, bool)
        on_disk[[self.flat(e) for e in table.pinned]] = False
        self.state = CacheState(np.full((len(self.gpus), S), NO_SLOT, np.int32), np.full(L * E, -1, np.int32),
                                np.zeros(L * E, np.int64), expert_bytes, on_disk, np.zeros(len(self.gpus)))
        for gpu, g in self.row.items():
            self.state.slot_expert[g, : table.n_slots[gpu]] = -1
            for s, eid in enumerate(table.holder[gpu]):
                if eid is not None:
                    self.state.slot_expert[g, s] = self.flat(eid)
                    self.state.expert_slot[self.flat(eid)] = g * S + s
        self.in_flight: dict[int, tuple[int, int]] = {}  # flat id -> (GPU row, bytes) of copies not yet landed
        # predictions (online.update's arguments; the absent predictors as zero-stride zeros)
        chance = np.full((L, E), n_expert_used / n_expert)
        if prior is not None:
            for eid, p in prior.items():
                if eid.layer in self.position:
                    chance[self.position[eid.layer], eid.expert] = p
        self.prior = chance
        self.counts = chance * PROFILE_TOKENS + 1.0  # (L, E) uses so far
        self.decayed = chance.copy()  # (L, E) uses with exponential forgetting
        self.recent = chance.astype(np.float32)  # (L, E) each layer's next visit
        self.ahead = np.zeros((D, E), np.float32)  # (D, E) this token's next layers
        self.mix = np.tile(np.array([0.0, 0.0, 1.0]), (D, 1))  # a layer ahead: its next visit alone
        self.cross = np.broadcast_to(np.zeros((), np.float32), (D, L, E, E))
        self.reuse = np.broadcast_to(np.zeros((), np.float32), (L, E, E))
        self.no_gate = np.zeros((0, E), np.float32)
        self.no_visit_weights = np.zeros(0)  # the mixture, not fitted weights, gives the next visit
        self.forgetting = np.zeros((len(HALF_LIVES_TOKENS), L, E))  # fitted next visits only: unused
        self.decay = 0.5 ** (1.0 / settings.half_life_tokens)
        self.actions = np.empty(max(n_expert, 1), np.int8)
        self.prefetch = np.zeros(settings.max_prefetch, np.int64)
        self.step_s, self._last_tick = 0.0, None

    def flat(self, eid: ExpertId) -> int:
        return self.position[eid.layer] * self.E + eid.expert

    def tick(self, n_steps: int) -> float:
        """The running estimate of a layer step's seconds, from the time since the last tick over n_steps steps
        (a sample at most 10x the estimate: an idle engine is not a slow step)."""
        now = time.perf_counter()
        if self._last_tick is not None and n_steps:
            sample = (now - self._last_tick) / n_steps
            self.step_s = sample if not self.step_s else \
                (1 - STEP_EMA) * self.step_s + STEP_EMA * min(sample, 10 * self.step_s)
        self._last_tick = now
        return self.step_s

    def step(self, layer: int, tokens_per_expert: Mapping[int, int], speeds: LinkSpeeds, step_s: float,
             stage_cpu_share: float = 0.0, read_back: bool = True) -> StepPlan:
        """Predictions brought up to date with this step's routing, then plan_step's decisions, applied to the
        SlotTable. read_back: misses left uncached run on the CPU (the read-back path has no staging) and the step
        waits for the copies of those cached, so where the CPU runs an expert over the step's tokens sooner than
        the link copies it no miss is admitted, and else a step that runs an expert over several tokens (prefill, a
        batch) admits every miss it has a slot for: the CPU's time grows with the tokens, a copy's does not. Else
        (decode on the device) uncached misses are staged, with the CPU computing stage_cpu_share of each."""
        pos, K = self.position[layer], len(tokens_per_expert)
        experts = np.fromiter(tokens_per_expert, np.int64, K)
        tokens = np.fromiter(tokens_per_expert.values(), np.float64, K)
        update(pos, experts, tokens / tokens.sum(), self.prior, self.cross, self.mix, self.reuse, self.no_gate, 0.0,
               self.no_gate[:, 0], 0.0, self.counts, self.decayed, self.decay, self.s.online_weight,
               self.s.recency_weight, self.no_visit_weights, self.forgetting, DECAY, self.recent, self.ahead)
        most = float(tokens.max())
        cpu_bytes_per_s = speeds.cpu_bytes_per_s / most
        margin = self.s.admit_margin
        if read_back and cpu_bytes_per_s > speeds.h2d_bytes_per_s:
            margin = np.inf
        elif read_back and most > 1:
            margin = 0.0
        # Decode on the device stages every miss through the same link, so a prefetch takes link time from later
        # steps' misses, and at batch 1 with no trace tables its prediction is the running frequency alone: in the
        # device replay one prefetch a token (95-110 MB) lowered the hit rate (Mixtral 24 GiB, uniform slots: 0.925
        # against LFU's 0.932), and no queue (no prefetches) beat every setting with one on every trace.
        queue_steps = self.s.queue_steps if read_back else 0.0
        st, needed = self.state, experts + pos * self.E
        backlog_s = np.zeros(len(self.gpus))
        for g, n_bytes in self.in_flight.values():
            backlog_s[g] += n_bytes / speeds.h2d_bytes_per_s
        actions = self.actions[:K]
        n = plan_step(pos, needed, self.ahead, self.recent, st.slot_expert, st.expert_slot, st.remaining_bytes,
                      st.on_disk, st.expert_bytes, speeds.h2d_bytes_per_s, cpu_bytes_per_s,
                      speeds.disk_bytes_per_s, stage_cpu_share, step_s, backlog_s, queue_steps, margin,
                      self.s.link_value, actions, self.prefetch)
        out = StepPlan()
        for i in range(K):
            eid = ExpertId(layer, int(experts[i]))
            if actions[i] == HIT:
                out.hits.append(eid)
            elif actions[i] == FETCH and eid in self.table.slot_of:
                out.waits.append(eid)
            elif actions[i] == FETCH:
                out.placed.append((eid, self._apply(int(needed[i]), eid, out)))
            else:
                out.uncached.append(eid)
        for x in self.prefetch[:n]:
            eid = ExpertId(self.moe_layers[x // self.E], int(x % self.E))
            out.prefetch.append((eid, self._apply(int(x), eid, out)))
        return out

    def _apply(self, x: int, eid: ExpertId, out: StepPlan) -> Slot:
        """Mirror plan_step's placement of x in the SlotTable, its slot's holder evicted first."""
        S = self.state.slot_expert.shape[1]
        g, index = divmod(int(self.state.expert_slot[x]), S)
        gpu = self.gpus[g]
        old = self.table.holder[gpu][index]
        if old is not None:
            out.evicted.append((old, self.table.evict(old)))
            self.in_flight.pop(self.flat(old), None)
        slot = self.table.place(eid, gpu, index)
        self.in_flight[x] = (g, int(self.state.expert_bytes[x]))
        return slot

    def landed(self, eid: ExpertId) -> None:
        """eid's copy into its slot is done (or compute waits for it): a hit from now on."""
        x = self.flat(eid)
        if self.in_flight.pop(x, None) is not None:
            self.state.remaining_bytes[x] = 0

    def check(self) -> None:
        """The planner's arrays say what the SlotTable says: the same holder in every slot, padding past each
        GPU's slot count, bytes in flight only for copies under way."""
        st = self.state
        st.check()
        for gpu, g in self.row.items():
            n = self.table.n_slots[gpu]
            want = [-1 if e is None else self.flat(e) for e in self.table.holder[gpu]]
            assert st.slot_expert[g, :n].tolist() == want, f"GPU {gpu}: planner slots disagree with the table"
            assert (st.slot_expert[g, n:] == NO_SLOT).all(), f"GPU {gpu}: padding holds an expert"
        moving = np.flatnonzero(st.remaining_bytes)
        assert set(moving.tolist()) == set(self.in_flight), "bytes in flight disagree with the copies under way"
