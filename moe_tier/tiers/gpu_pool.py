"""GPU expert tiers: slot arenas on every GPU, the pinned warm arena, the cold reader, and acquire().

Shape key: S slots per GPU of slot_bytes each; arena[g] is (S * slot_bytes,) uint8, slot i = bytes
[i * slot_bytes, (i + 1) * slot_bytes); an expert's blob (host_tiers.blob_layout) sits at the start of its slot.

acquire(layer, {expert: tokens}) returns where each chosen expert will be computed: GPU slots (hits and
fetches) or the CPU (from the warm arena or the file map), per the cost model in links.py and the eviction policy
(lru, lfu), or as the live planner decides (planner: live_planner.py, which also prefetches). Copies run on one
copy stream per GPU and are ordered against compute with events; the host waits only on a staging buffer's
own event before reusing it, never on the whole device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from moe_tier.errors import MoeTierError
from moe_tier.fits import FitStore
from moe_tier.host_tiers import blob_weights
from moe_tier.machine import Machine, probe
from moe_tier.moe import ExpertWeights
from moe_tier.plan import TierPlan
from moe_tier.reader import ExpertId, ModelDesc
from moe_tier.stats import EngineStats
from moe_tier.tiers import links
from moe_tier.tiers.cold import ColdReader
from moe_tier.tiers.links import LinkSpeeds, Miss
from moe_tier.tiers.live_planner import LIVE_SETTINGS, LivePlanner, StepPlan
from moe_tier.tiers.locations import ExpertLocations
from moe_tier.tiers.slots import POLICIES, Slot, SlotTable, Tier
from moe_tier.tiers.warm import PinnedArena, align_up
from router_predict.policies import PlannerSettings


@dataclass(frozen=True)
class TierConfig:
    policy: str = "lru"  # slots.POLICY_NAMES
    reader_threads: int = 4
    staging_buffers: int = 2  # cold fetches in flight per acquire
    headroom_bytes: int = 256 << 20  # must stay allocatable on each GPU after its arena (activations)
    speeds: LinkSpeeds | None = None  # None: measured at start-up
    prior: Mapping[ExpertId, float] | None = None  # chance of use per token from a routing profile (planner policy)
    planner: PlannerSettings = LIVE_SETTINGS  # the planner policy's settings
    stage_slots: int = 0  # slots per GPU kept out of the table where decode copies warm experts (moe_decode), if
    # every expert is pinned and the pool cannot hold them all


@dataclass
class Acquired:
    gpu: dict[int, list[tuple[ExpertId, int]]] = field(default_factory=dict)  # GPU -> (expert, blob byte offset)
    cpu: list[tuple[ExpertId, ExpertWeights]] = field(default_factory=list)


def allocate_arena(device: torch.device, n_slots: int, slot_bytes: int, headroom_bytes: int) -> tuple[torch.Tensor, int]:
    """Fit discovery: allocate n_slots slots; on CUDA OOM shrink to what the free memory says, retry."""
    while True:
        try:
            arena = torch.empty(n_slots * slot_bytes, dtype=torch.uint8, device=device)
            try:
                headroom = torch.empty(headroom_bytes, dtype=torch.uint8, device=device)  # can activations fit?
                del headroom
            except torch.cuda.OutOfMemoryError:
                del arena
                raise
            return arena, n_slots
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if n_slots == 0:
                raise MoeTierError(None, f"GPU {device} cannot keep {headroom_bytes:,} bytes of headroom free") from None
            free_bytes, _ = torch.cuda.mem_get_info(device)
            n_slots = max(0, min(n_slots - 1, (free_bytes - headroom_bytes) // slot_bytes))


class GpuTiers:
    def __init__(self, desc: ModelDesc, plan: TierPlan, stats: EngineStats, config: TierConfig = TierConfig(),
                 fits: FitStore | None = None, machine: Machine | None = None):
        if not torch.cuda.is_available():
            raise MoeTierError(desc.path, "the GPU tiers need CUDA (torch.cuda.is_available() is False)")
        self.desc, self.stats, self.config = desc, stats, config
        self.reader = ColdReader(desc.path, config.reader_threads)
        self.warm = PinnedArena(desc, plan.pinned, self.reader)
        self.slot_bytes = align_up(max((g.slot_bytes for g in plan.gpus), default=1))
        self.layer_gpu = {layer: g.index for g in plan.gpus for layer in g.layers}
        self.arena: dict[int, torch.Tensor] = {}
        for g in plan.gpus:
            device = torch.device("cuda", g.index)
            self.arena[g.index], n = allocate_arena(device, g.n_slots, self.slot_bytes, config.headroom_bytes)
            if n < g.n_slots and fits is not None:
                runtime = (machine or probe()).runtime
                fits.remember(desc.fingerprint, g.name, runtime, {"n_slots": n, "slot_bytes": self.slot_bytes})
        n_slots = {g: a.numel() // self.slot_bytes for g, a in self.arena.items()}
        # Staging serves decode's device path (every expert pinned) when some expert must stay out of the slots.
        stages = sum(n_slots.values()) < len(desc.experts) and len(plan.pinned) == len(desc.experts)
        self.stage_slots = {g: min(config.stage_slots, n) if stages else 0 for g, n in n_slots.items()}  # last slots
        self.stage_at = {g: (n - self.stage_slots[g]) * self.slot_bytes for g, n in n_slots.items()}
        self.table = SlotTable(desc.experts, {g: n - self.stage_slots[g] for g, n in n_slots.items()}, plan.pinned)
        self.policy = POLICIES[config.policy]() if config.policy != "planner" else None
        self.planner: LivePlanner | None = None
        self.copy_stream = {g: torch.cuda.Stream(torch.device("cuda", g)) for g in self.arena}
        staging_bytes = max(ColdReader.staging_bytes([(p.offset, p.n_bytes) for p in r.parts]) for r in desc.experts.values())
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(config.staging_buffers)]
        self.staging_done: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self.locations = ExpertLocations(desc.config.n_layer, desc.config.n_expert, self.arena, self.warm, self.layer_gpu)
        self.pending: list[tuple[ExpertId, Slot, torch.cuda.Event]] = []  # promotions whose copies may run
        self.speeds = config.speeds or self._measure()
        for gpu in self.arena:
            placed = [eid for eid, g in plan.hot.items() if g == gpu][: self.table.n_free(gpu)]
            self.fetch(placed, gpu)  # planned hot experts beyond a shrunk pool stay warm or cold
        if config.policy == "planner":
            self.planner = LivePlanner({e: r.n_bytes for e, r in desc.experts.items()}, desc.moe_layers,
                                       desc.config.n_expert, desc.config.n_expert_used, self.table, config.prior,
                                       config.planner)
        self.check()

    # -- placement ---------------------------------------------------------------------------------------------

    def blob_offset(self, eid: ExpertId) -> tuple[int, int]:
        slot = self.table.slot_of[eid]
        return slot.gpu, slot.index * self.slot_bytes

    def fetch(self, eids: list[ExpertId], gpu: int, protected: frozenset[ExpertId] = frozenset()) -> None:
        """Copy experts into slots on gpu (evicting by policy, never a protected one); compute waits on the copies."""
        self._copy_in([(eid, self._make_room(eid, gpu, protected | frozenset(eids))) for eid in eids])

    def _copy_in(self, placed: list[tuple[ExpertId, Slot]]) -> None:
        """Copy experts into the slots the table gave them; each GPU's compute waits on its copies."""
        for gpu in sorted({slot.gpu for _, slot in placed}):
            device, stream = torch.device("cuda", gpu), self.copy_stream[gpu]
            stream.wait_stream(torch.cuda.current_stream(device))  # queued kernels may still read slots we overwrite
            cold = []
            for eid, slot in placed:
                if slot.gpu != gpu:
                    continue
                if eid in self.warm:
                    with torch.cuda.stream(stream):
                        self._slot_view(slot, self.desc.experts[eid].n_bytes).copy_(self.warm.blob(eid),
                                                                                    non_blocking=True)
                    self.stats.moved("warm->gpu", self.desc.experts[eid].n_bytes)
                else:
                    cold.append((eid, slot))
            for wave in range(0, len(cold), len(self.staging)):
                self._fetch_cold(cold[wave : wave + len(self.staging)], stream)
            torch.cuda.current_stream(device).wait_stream(stream)
        for eid, slot in placed:
            self.locations.hot(eid, slot.gpu, slot.index * self.slot_bytes)

    def promote(self, eid: ExpertId, gpu: int, protected: frozenset[ExpertId]) -> bool:
        """Start copying a warm expert into a slot, if the policy prefers it to the slot's holder, without making
        compute wait: kernels read its pinned copy until settle() sees the copy done and points the table at it."""
        if not self.table.n_free(gpu):
            victim = self.policy.victim(e for e in self.table.hot_on(gpu) if e not in protected)
            if victim is None or not self.policy.prefers(eid, victim):
                return False
        self._start_copy(eid, self._make_room(eid, gpu, protected))
        return True

    def planned(self, layer: int, tokens_per_expert: dict[int, int], step_s: float, stage_cpu_share: float = 0.0,
                read_back: bool = True) -> StepPlan:
        """The live planner's decisions for one layer step, carried out: slots left; on the read-back path the misses
        given a slot copied in and those whose prefetch is under way waited for by compute, on the device path
        (read_back False) their copies started as promote's while decode stages them this step; then the
        prefetches' copies, queued last so that compute waits for none of them."""
        plan = self.planner.step(layer, tokens_per_expert, self.speeds, step_s, stage_cpu_share, read_back)
        for eid, slot in plan.evicted:
            self.locations.left(eid, slot.gpu)
        if read_back:
            self._copy_in(plan.placed)
            for eid in plan.waits:
                slot = self.table.slot_of[eid]
                torch.cuda.current_stream(torch.device("cuda", slot.gpu)).wait_stream(self.copy_stream[slot.gpu])
                self.locations.hot(eid, slot.gpu, slot.index * self.slot_bytes)
        for eid, slot in plan.prefetch if read_back else (*plan.placed, *plan.prefetch):
            self._start_copy(eid, slot)
        return plan

    def _start_copy(self, eid: ExpertId, slot: Slot) -> None:
        """Queue a warm expert's copy into its slot behind the compute queued so far; settle() sees it land."""
        stream = self.copy_stream[slot.gpu]
        stream.wait_stream(torch.cuda.current_stream(torch.device("cuda", slot.gpu)))
        with torch.cuda.stream(stream):
            self._slot_view(slot, self.desc.experts[eid].n_bytes).copy_(self.warm.blob(eid), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.pending.append((eid, slot, done))
        self.stats.moved("warm->gpu", self.desc.experts[eid].n_bytes)

    def settle(self) -> None:
        """Point the table at the slots whose copies have finished (a query, never a wait)."""
        still = []
        for eid, slot, done in self.pending:
            if self.table.slot_of.get(eid) != slot:
                continue  # evicted again before its copy finished
            if done.query():
                self.locations.hot(eid, slot.gpu, slot.index * self.slot_bytes)
                if self.planner is not None:
                    self.planner.landed(eid)
            else:
                still.append((eid, slot, done))
        self.pending = still

    def _fetch_cold(self, batch: list[tuple[ExpertId, Slot]], stream: torch.cuda.Stream) -> None:
        """Disk reads of the whole batch in flight at once; each expert's copy starts as its read completes."""
        reads = []
        t0 = time.perf_counter()
        for i, (eid, slot) in enumerate(batch):
            if self.staging_done[i] is not None:
                self.staging_done[i].synchronize()  # that buffer's previous copy, not the device
            ranges = [(p.offset, p.n_bytes) for p in self.desc.experts[eid].parts]
            reads.append(self.reader.submit(ranges, self.staging[i].numpy()))
        self.stats.waited("disk->gpu", time.perf_counter() - t0)
        for i, ((eid, slot), read) in enumerate(zip(batch, reads)):
            at = slot.index * self.slot_bytes
            t0 = time.perf_counter()
            spans = read.wait()
            self.stats.waited("disk->gpu", time.perf_counter() - t0)
            with torch.cuda.stream(stream):
                for span in spans:
                    self.arena[slot.gpu][at : at + span.n_bytes].copy_(
                        self.staging[i][span.start : span.start + span.n_bytes], non_blocking=True)
                    at += span.n_bytes
                self.staging_done[i] = torch.cuda.Event()
                self.staging_done[i].record(stream)
            self.stats.moved("disk->gpu", self.desc.experts[eid].n_bytes)

    def _make_room(self, eid: ExpertId, gpu: int, protected: frozenset[ExpertId]) -> Slot:
        if not self.table.n_free(gpu):
            victim = self.policy.victim(e for e in self.table.hot_on(gpu) if e not in protected)
            if victim is None:
                raise MoeTierError(self.desc.path, f"GPU {gpu}: every slot holds an expert this step needs")
            self.table.evict(victim)
            self.locations.left(victim, gpu)
            self.policy.forget(victim)
        return self.table.place(eid, gpu)

    def _slot_view(self, slot: Slot, n_bytes: int) -> torch.Tensor:
        at = slot.index * self.slot_bytes
        return self.arena[slot.gpu][at : at + n_bytes]

    # -- the engine's entry point -----------------------------------------------------------------------------

    def acquire(self, layer: int, tokens_per_expert: dict[int, int]) -> Acquired:
        """Hits as they are; misses fetched into the layer's GPU or computed on the CPU, per the cost model (or
        the live planner, which may place them on any GPU)."""
        if self.planner is not None:
            return self._acquire_planned(layer, tokens_per_expert)
        home = self.layer_gpu[layer]
        wanted = [ExpertId(layer, int(e)) for e in tokens_per_expert]
        protected = frozenset(wanted)
        misses = [Miss(eid, self.desc.experts[eid].n_bytes, self.table.tier(eid), int(tokens_per_expert[eid.expert]))
                  for eid in wanted if self.table.tier(eid) is not Tier.HOT]
        evictable = sum(e not in protected for e in self.table.hot_on(home))
        decision = links.decide(misses, self.speeds, self.table.n_free(home) + evictable)
        if decision.fetch:
            self.fetch([m.eid for m in decision.fetch], home, protected)
        out = Acquired()
        fetched = {m.eid for m in decision.fetch}
        for eid in wanted:
            self.policy.touch(eid)
            if self.table.tier(eid) is Tier.HOT:
                gpu, offset = self.blob_offset(eid)
                out.gpu.setdefault(gpu, []).append((eid, offset))
                if eid not in fetched:
                    self.stats.served("hot", self.desc.experts[eid].n_bytes)
        for m in decision.cpu:
            out.cpu.append((m.eid, self.host_weights(m.eid)))
        for m in misses:  # a miss counts for the tier that had it; links count the moves
            self.stats.served(m.tier.value, m.n_bytes)
        return out

    def _acquire_planned(self, layer: int, tokens_per_expert: dict[int, int]) -> Acquired:
        """One plan_step: misses it caches are copied into its slots (compute waits), the layer's experts whose
        prefetch is still under way are waited for by compute, the rest run on the CPU; prefetches copy behind."""
        self.settle()
        plan = self.planned(layer, tokens_per_expert, self.planner.tick(1))
        out = Acquired()
        for eid in (*plan.hits, *plan.waits, *(e for e, _ in plan.placed)):
            self.planner.landed(eid)
            gpu, offset = self.blob_offset(eid)
            out.gpu.setdefault(gpu, []).append((eid, offset))
        for eid in plan.uncached:
            out.cpu.append((eid, self.host_weights(eid)))
        for eid in (*plan.hits, *plan.waits):
            self.stats.served("hot", self.desc.experts[eid].n_bytes)
        for eid in (*(e for e, _ in plan.placed), *plan.uncached):  # a miss counts for the tier that had it
            self.stats.served("warm" if eid in self.warm else "cold", self.desc.experts[eid].n_bytes)
        return out

    def host_weights(self, eid: ExpertId) -> ExpertWeights:
        """CPU-side weights: the pinned blob if warm, else read from the file past the page cache."""
        if eid in self.warm:
            return self.warm.weights(eid)
        ref = self.desc.experts[eid]
        ranges = [(p.offset, p.n_bytes) for p in ref.parts]
        staging = np.empty(self.reader.staging_bytes(ranges), dtype=np.uint8)
        t0 = time.perf_counter()
        spans = self.reader.read(ranges, staging)
        self.stats.waited("disk->cpu", time.perf_counter() - t0)
        self.stats.moved("disk->cpu", ref.n_bytes)
        return blob_weights(ref, np.concatenate([staging[s.start : s.start + s.n_bytes] for s in spans]))

    def read_back(self, eid: ExpertId) -> np.ndarray:
        """A hot expert's slot bytes on the host (tests, debugging): waits for that GPU's queued copies."""
        gpu, offset = self.blob_offset(eid)
        torch.cuda.current_stream(torch.device("cuda", gpu)).wait_stream(self.copy_stream[gpu])
        return self.arena[gpu][offset : offset + self.desc.experts[eid].n_bytes].cpu().numpy()

    def check(self) -> None:
        self.table.check()
        if self.planner is not None:
            self.planner.check()
        self.locations.check(self.table.slot_of, self.slot_bytes)
        for gpu, arena in self.arena.items():
            n_slots = self.table.n_slots[gpu] + self.stage_slots[gpu]
            assert arena.numel() == n_slots * self.slot_bytes, f"GPU {gpu} arena changed size"

    def close(self) -> None:
        self.reader.close()

    def _measure(self) -> LinkSpeeds:
        first = next(iter(self.arena), 0)
        h2d = links.measure_h2d(torch.device("cuda", first))
        ranges = [(p.offset, p.n_bytes) for r in self.desc.experts.values() for p in r.parts]
        disk = links.measure_disk(self.reader, ranges)
        cpu = links.measure_cpu([self.host_weights(e) for e in self._cpu_sample()], self.desc.config.n_embd)
        return LinkSpeeds(h2d, disk, cpu)

    def _cpu_sample(self) -> list[ExpertId]:
        """Warm experts (in pinned memory, no disk read) up to links.CPU_SAMPLE_BYTES; the first expert if none."""
        sample, total = [], 0
        for eid in self.warm.offset:
            if total >= links.CPU_SAMPLE_BYTES:
                break
            sample.append(eid)
            total += self.desc.experts[eid].n_bytes
        return sample or [next(iter(self.desc.experts))]
