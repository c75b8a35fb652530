"""The planner's eviction rule (router_predict/planner.py) for the live decode path: evict the hot expert
whose next use is expected furthest away, and promote a miss only when its own next use is clearly nearer.

Time is counted in tokens. A step's touches come layer by layer in ascending order (DeviceMoE.account,
GpuTiers.acquire), so a touch at a lower layer than the previous one, or of an expert already touched since the
last boundary, starts a new token. Per expert, seen from the token a copy issued now is first read (two tokens
on: the routing arrives a step late, the copy lands during the next step):
    q = chance of use per token: uses counted with a long half-life (a profile's frequency is its start value)
    p = chance at that token: q mixed with uses counted with a short half-life (token reuse)
    E[T] = 1 + (1 - p) / q  tokens until the next use
as the planner's E[T] = dist + (1 - p) * L / q with every layer one token away. A miss takes a slot only with
MIN_USES uses behind it and an E[T] MARGIN times smaller than the victim's: a copy costs link time that only
repeated hits repay, and an estimate from a use or two is noise. Values are memoized per token (within a token
only a touch changes one), so the victims of one step cost a dictionary look-up per candidate. The constants
were chosen by replaying the fitting halves of bench/replay_device_policies.py's traces.
"""

from __future__ import annotations

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
    """Largest E[T] out; a miss in only when prefers() says so. Counts survive eviction."""

    def __init__(self, prior: Mapping[ExpertId, float] | None = None):
        self.prior = dict(prior or {})  # expert -> chance of use per token, from a routing profile
        self.token = 0
        self.prev_layer = -1
        self.seen: set[ExpertId] = set()  # touched since the current token began
        self.last: dict[ExpertId, int] = {}  # token of the last use
        self.short: dict[ExpertId, float] = {}  # forgetting use counts as of the last use
        self.long: dict[ExpertId, float] = {}
        self.uses: dict[ExpertId, int] = {}
        self.value: dict[ExpertId, float] = {}  # E[T] memo, valid for self.value_token
        self.value_token = 0
        self.ds, self.dl = 0.5 ** (1 / SHORT_HALF_LIFE_TOKENS), 0.5 ** (1 / LONG_HALF_LIFE_TOKENS)

    def touch(self, eid: ExpertId) -> None:
        if eid.layer < self.prev_layer or eid in self.seen:
            self.token += 1
            self.seen.clear()
        self.prev_layer = eid.layer
        self.seen.add(eid)
        age = self.token - self.last.get(eid, 0)
        self.short[eid] = self.short.get(eid, 0.0) * self.ds ** age + 1.0
        self.long[eid] = self.long.get(eid, self.prior.get(eid, 0.0) / (1 - self.dl)) * self.dl ** age + 1.0
        self.uses[eid] = self.uses.get(eid, 0) + 1
        self.last[eid] = self.token
        self.value.pop(eid, None)

    def forget(self, eid: ExpertId) -> None:
        pass  # an evicted expert keeps its counts: they rank it when it misses again

    def next_use_tokens(self, eid: ExpertId) -> float:
        """E[T] of eid (memoized until the token changes or eid is touched)."""
        v = self._memo().get(eid)
        return self._value(eid) if v is None else v

    def _memo(self) -> dict[ExpertId, float]:
        if self.value_token != self.token:
            self.value.clear()
            self.value_token = self.token
        return self.value

    def _value(self, eid: ExpertId) -> float:
        age = self.token + AHEAD_TOKENS - self.last.get(eid, 0)
        q = self.long.get(eid, self.prior.get(eid, 0.0) / (1 - self.dl)) * self.dl ** age * (1 - self.dl)
        p_short = self.short.get(eid, 0.0) * self.ds ** age * (1 - self.ds)
        p = min(SHORT_WEIGHT * p_short + (1 - SHORT_WEIGHT) * q, 1.0)
        v = self.value[eid] = 1.0 + (1.0 - p) / max(q, EPS)
        return v

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None:
        """The candidate used furthest ahead (ties: the smaller expert id, so replays are deterministic)."""
        value, compute = self._memo(), self._value  # inline look-ups: this loop is the policy's hot path
        best, best_v = None, -1.0
        for e in candidates:
            v = value.get(e)
            if v is None:
                v = compute(e)
            if v > best_v or (v == best_v and e < best):
                best, best_v = e, v
        return best

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        return self.uses.get(newcomer, 0) >= MIN_USES and \
            self.next_use_tokens(victim) > MARGIN * self.next_use_tokens(newcomer)
