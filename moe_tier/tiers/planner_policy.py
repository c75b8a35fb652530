"""The planner's eviction rule (router_predict/planner.py) for the live decode path: evict the hot expert
whose next use is expected furthest away, and promote a miss only when its own next use is clearly nearer.

Time is counted in tokens. A step's touches come layer by layer in ascending order (DeviceMoE.account,
GpuTiers.acquire), so a touch at a lower layer than the previous one, or of an expert already touched since the
last boundary, starts a new token. Per expert, seen from the token a copy issued now is first read (two tokens
on: the routing arrives a step late, the copy lands during the next step):
    q = chance of use per token: uses counted with a long half-life (a profile's frequency is its start value)
    p = chance at that token: q mixed with uses counted with a short half-life (token reuse)
    E[T] = 1 + (1 - p) / q  tokens until the next use
as the planner's E[T] = dist + (1 - p) * L / q with every layer one token away. The victim is the candidate of
least q (E[T]'s dominant term), kept as a rank that only a touch changes, so a victim costs one dictionary
look-up per candidate. A miss takes the slot only with MIN_USES uses behind it and an E[T] MARGIN times smaller
than the victim's: a copy costs link time that only repeated hits repay, and an estimate from a use or two is
noise. The constants were chosen by replaying the fitting parts of bench/replay_device_policies.py's traces.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from moe_tier.reader import ExpertId

SHORT_HALF_LIFE_TOKENS = 1.0
LONG_HALF_LIFE_TOKENS = 32.0
SHORT_WEIGHT = 0.3  # in p, against q
AHEAD_TOKENS = 2
MARGIN = 2.0  # E[T](victim) > MARGIN * E[T](miss)
MIN_USES = 4
EPS = 1e-4


class PlannerPolicy:
    """Least q (largest E[T]) out; a miss in only when prefers() says so. Counts survive eviction."""

    def __init__(self, prior: Mapping[ExpertId, float] | None = None):
        self.prior = dict(prior or {})  # expert -> chance of use per token, from a routing profile
        self.token = 0
        self.prev_layer = -1
        self.seen: set[ExpertId] = set()  # touched since the current token began
        self.last: dict[ExpertId, int] = {}  # token of the last use
        self.short: dict[ExpertId, float] = {}  # forgetting use counts as of the last use
        self.long: dict[ExpertId, float] = {}
        self.uses: dict[ExpertId, int] = {}
        self.rank: dict[ExpertId, float] = {}  # log of the long count referred back to token 0: orders q for good
        self.ds, self.dl = 0.5 ** (1 / SHORT_HALF_LIFE_TOKENS), 0.5 ** (1 / LONG_HALF_LIFE_TOKENS)

    def touch(self, eid: ExpertId) -> None:
        if eid.layer < self.prev_layer or eid in self.seen:
            self.token += 1
            self.seen.clear()
        self.prev_layer = eid.layer
        self.seen.add(eid)
        age = self.token - self.last.get(eid, 0)
        self.short[eid] = self.short.get(eid, 0.0) * self.ds ** age + 1.0
        self.long[eid] = self.long.get(eid, self._long_start(eid)) * self.dl ** age + 1.0
        self.uses[eid] = self.uses.get(eid, 0) + 1
        self.last[eid] = self.token
        self.rank[eid] = math.log(self.long[eid]) - self.token * math.log(self.dl)

    def _long_start(self, eid: ExpertId) -> float:
        """The long count of an expert never touched: its profile chance as a steady-state count."""
        return self.prior.get(eid, 0.0) / (1 - self.dl)

    def forget(self, eid: ExpertId) -> None:
        pass  # an evicted expert keeps its counts: they rank it when it misses again

    def next_use_tokens(self, eid: ExpertId) -> float:
        """E[T] of eid, seen AHEAD_TOKENS on."""
        age = self.token + AHEAD_TOKENS - self.last.get(eid, 0)
        q = self.long.get(eid, self._long_start(eid)) * self.dl ** age * (1 - self.dl)
        p_short = self.short.get(eid, 0.0) * self.ds ** age * (1 - self.ds)
        p = min(SHORT_WEIGHT * p_short + (1 - SHORT_WEIGHT) * q, 1.0)
        return 1.0 + (1.0 - p) / max(q, EPS)

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None:
        """The candidate of least q, E[T]'s dominant term (p weighs little two tokens ahead). q decays at one rate
        for every expert, so its order only changes at a touch and needs no per-token work: with decisions every
        step over every slot, this loop is the policy's hot path. Ties: the smaller expert id."""
        rank, best, best_r = self.rank, None, math.inf
        for e in candidates:
            r = rank.get(e)
            if r is None:
                start = self._long_start(e)
                r = rank[e] = math.log(start) if start > 0 else -math.inf
            if r < best_r or (r == best_r and e < best):
                best, best_r = e, r
        return best

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        return self.uses.get(newcomer, 0) >= MIN_USES and \
            self.next_use_tokens(victim) > MARGIN * self.next_use_tokens(newcomer)
