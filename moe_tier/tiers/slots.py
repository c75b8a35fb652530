"""The slot table: which expert sits in which GPU slot, one table across GPUs, and every expert's tier.

Pure bookkeeping (no torch), so its invariants are tested without a GPU. Tiers partition the experts:
  hot  = in a GPU slot (it may also keep its pinned copy, so eviction costs no copy back)
  warm = has a pinned host copy and no slot
  cold = neither: only the file holds it
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Iterable, NamedTuple, Protocol

from moe_tier.reader import ExpertId


class Tier(enum.Enum):
    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


class Slot(NamedTuple):
    gpu: int
    index: int


class SlotTable:
    """Fixed slots per GPU (the count never changes), a free list per GPU, expert <-> slot both ways."""

    def __init__(self, experts: Iterable[ExpertId], n_slots: dict[int, int], pinned: Iterable[ExpertId]):
        self.experts = frozenset(experts)
        self.pinned = frozenset(pinned)  # experts with a warm (pinned host) copy, fixed at start-up
        if not self.pinned <= self.experts:
            raise ValueError("pinned experts must be experts of the model")
        self.n_slots = dict(n_slots)
        self.holder: dict[int, list[ExpertId | None]] = {g: [None] * n for g, n in self.n_slots.items()}
        self.free: dict[int, list[int]] = {g: list(range(n - 1, -1, -1)) for g, n in self.n_slots.items()}
        self.slot_of: dict[ExpertId, Slot] = {}

    def tier(self, eid: ExpertId) -> Tier:
        if eid in self.slot_of:
            return Tier.HOT
        return Tier.WARM if eid in self.pinned else Tier.COLD

    def n_free(self, gpu: int) -> int:
        return len(self.free[gpu])

    def hot_on(self, gpu: int) -> list[ExpertId]:
        return [e for e in self.holder[gpu] if e is not None]

    def place(self, eid: ExpertId, gpu: int, index: int | None = None) -> Slot:
        """Give eid a free slot on gpu, that one if index is given (the caller then copies its bytes in)."""
        assert eid in self.experts and eid not in self.slot_of, f"{eid} is not a model expert without a slot"
        assert self.free[gpu], f"GPU {gpu} has no free slot"
        if index is None:
            index = self.free[gpu].pop()
        else:
            self.free[gpu].remove(index)  # raises if that slot is taken
        slot = Slot(gpu, index)
        assert self.holder[gpu][slot.index] is None
        self.holder[gpu][slot.index] = eid
        self.slot_of[eid] = slot
        return slot

    def evict(self, eid: ExpertId) -> Slot:
        """Free eid's slot; the expert falls back to warm (pinned copy) or cold."""
        slot = self.slot_of.pop(eid)
        assert self.holder[slot.gpu][slot.index] == eid
        self.holder[slot.gpu][slot.index] = None
        self.free[slot.gpu].append(slot.index)
        return slot

    def check(self) -> None:
        """Every expert in exactly one tier; slot counts constant; free list and holders complementary."""
        for gpu, n in self.n_slots.items():
            assert len(self.holder[gpu]) == n, f"GPU {gpu} has {len(self.holder[gpu])} slots, not {n}"
            used = {i for i, e in enumerate(self.holder[gpu]) if e is not None}
            free = self.free[gpu]
            assert len(free) == len(set(free)), f"GPU {gpu}: a slot is on the free list twice"
            assert used.isdisjoint(free) and len(used) + len(free) == n, f"GPU {gpu}: free list and holders disagree"
        held = [(e, Slot(g, i)) for g, h in self.holder.items() for i, e in enumerate(h) if e is not None]
        assert len(held) == len({e for e, _ in held}), "an expert holds two slots"
        assert dict(held) == self.slot_of, "slot_of disagrees with the slot holders"
        tiers = {t: {e for e in self.experts if self.tier(e) is t} for t in Tier}
        assert sum(len(s) for s in tiers.values()) == len(self.experts)
        assert tiers[Tier.HOT] == set(self.slot_of) and tiers[Tier.WARM] == set(self.pinned) - set(self.slot_of)


class EvictionPolicy(Protocol):
    """Chooses which hot expert leaves a GPU; told about every use."""

    def touch(self, eid: ExpertId) -> None: ...

    def forget(self, eid: ExpertId) -> None: ...

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None: ...

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        """Whether a missed expert should take the victim's slot (decode promotes misses only when this says so)."""


class LruPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self.order: OrderedDict[ExpertId, None] = OrderedDict()

    def touch(self, eid: ExpertId) -> None:
        self.order[eid] = None
        self.order.move_to_end(eid)

    def forget(self, eid: ExpertId) -> None:
        self.order.pop(eid, None)

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None:
        allowed = set(candidates)
        never_used = [e for e in allowed if e not in self.order]
        if never_used:
            return min(never_used)
        return next((e for e in self.order if e in allowed), None)

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        return True  # the miss was just used: always the most recent


LFU_MARGIN = 2  # uses


class LfuPolicy:
    """Least frequently used first (ties: least recently used); counts survive eviction."""

    def __init__(self) -> None:
        self.uses: dict[ExpertId, int] = {}
        self.lru = LruPolicy()

    def touch(self, eid: ExpertId) -> None:
        self.uses[eid] = self.uses.get(eid, 0) + 1
        self.lru.touch(eid)

    def forget(self, eid: ExpertId) -> None:
        self.lru.forget(eid)

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None:
        allowed = list(candidates)
        if not allowed:
            return None
        rank = {e: i for i, e in enumerate(self.lru.order)}
        return min(allowed, key=lambda e: (self.uses.get(e, 0), rank.get(e, -1)))

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        """More uses by a margin: near-uniform routing would otherwise swap near-equal experts back and forth."""
        return self.uses.get(newcomer, 0) > self.uses.get(victim, 0) + LFU_MARGIN


POLICIES = {"lru": LruPolicy, "lfu": LfuPolicy}
POLICY_NAMES = (*POLICIES, "planner")  # planner: no eviction policy; live_planner.LivePlanner decides each step
