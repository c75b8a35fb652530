"""The planner's eviction rule (router_predict/planner.py) for the live decode path: evict the hot expert
whose next use is expected furthest away, and promote a miss only when its own next use is clearly nearer.

Time is counted in tokens. A step's touches come layer by layer in ascending order (DeviceMoE.account,
GpuTiers.acquire), so a touch at a lower layer than the previous one, or of an expert already touched since the
last boundary, starts a new token. Per expert, with age = tokens since its last use:
    p = chance of use at the next token: uses counted with a short half-life (token reuse)
    q = chance at each later token: uses counted with a long half-life, mixed with its share since the start
        (a profile's frequencies are the prior of that share, when given)
    E[T] = 1 + (1 - p) / q  tokens until the next use
as the planner's E[T] = dist + (1 - p) * L / q with every layer one token away. Values are memoized per token
(only a touch changes one within a token), so the victims of one step cost a dictionary look-up per candidate.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from moe_tier.reader import ExpertId

SHORT_HALF_LIFE_TOKENS = 1.0
LONG_HALF_LIFE_TOKENS = 16.0
NEXT_SHORT_WEIGHT = 0.5  # p: short-term chance vs q
LONG_WEIGHT = 0.5  # q: long-half-life chance vs the share since the start
PRIOR_TOKENS = 32.0  # how many tokens of evidence a profile's frequency is worth
MARGIN = 1.5  # a miss replaces the victim only if E[T](victim) > MARGIN * E[T](miss): a copy costs link time
AHEAD_TOKENS = 2  # E[T] is seen from the token a copy issued now is first read from its slot
EPS = 1e-4


class PlannerPolicy:
    """Largest E[T] out; a miss in only if its E[T] is MARGIN times smaller. Counts survive eviction."""

    def __init__(self, prior: Mapping[ExpertId, float] | None = None):
        self.prior = dict(prior or {})  # expert -> chance of use per token, from a routing profile
        self.token = 0
        self.prev_layer = -1
        self.seen: set[ExpertId] = set()  # touched since the current token began
        self.last: dict[ExpertId, int] = {}  # token of the last use
        self.short: dict[ExpertId, float] = {}  # forgetting use counts as of the last use
        self.long: dict[ExpertId, float] = {}
        self.uses: dict[ExpertId, int] = {}
        self.value: dict[ExpertId, float] = {}  # E[T] memo, valid for self.token
        self.value_token = 0
        self.ds, self.dl = 0.5 ** (1 / SHORT_HALF_LIFE_TOKENS), 0.5 ** (1 / LONG_HALF_LIFE_TOKENS)

    def touch(self, eid: ExpertId) -> None:
        if eid.layer < self.prev_layer or eid in self.seen:
            self.token += 1
            self.seen.clear()
        self.prev_layer = eid.layer
        self.seen.add(eid)
        age = self.token - self.last.get(eid, self.token)
        self.short[eid] = self.short.get(eid, 0.0) * self.ds ** age + 1.0
        self.long[eid] = self.long.get(eid, 0.0) * self.dl ** age + 1.0
        self.uses[eid] = self.uses.get(eid, 0) + 1
        self.last[eid] = self.token
        self.value.pop(eid, None)

    def forget(self, eid: ExpertId) -> None:
        pass  # an evicted expert keeps its counts: they rank it when it misses again

    def next_use_tokens(self, eid: ExpertId) -> float:
        """E[T] of eid seen from the current token (memoized until the token changes or eid is touched)."""
        if self.value_token != self.token:
            self.value.clear()
            self.value_token = self.token
        v = self.value.get(eid)
        if v is None:
            now = self.token + AHEAD_TOKENS
            share = (self.uses.get(eid, 0) + PRIOR_TOKENS * self.prior.get(eid, 0.0)) / (now + PRIOR_TOKENS)
            if eid in self.last:
                age = now - self.last[eid]
                p_short = self.short[eid] * self.ds ** age * (1 - self.ds)
                q_long = self.long[eid] * self.dl ** age * (1 - self.dl)
            else:
                p_short = q_long = 0.0
            q = LONG_WEIGHT * q_long + (1 - LONG_WEIGHT) * share
            p = min(NEXT_SHORT_WEIGHT * p_short + (1 - NEXT_SHORT_WEIGHT) * q, 1.0)
            v = self.value[eid] = 1.0 + (1.0 - p) / max(q, EPS)
        return v

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId | None:
        """The candidate used furthest ahead (ties: the smaller expert id, so replays are deterministic)."""
        best, best_v = None, -1.0
        for e in candidates:
            v = self.next_use_tokens(e)
            if v > best_v or (v == best_v and e < best):
                best, best_v = e, v
        return best

    def prefers(self, newcomer: ExpertId, victim: ExpertId) -> bool:
        return self.next_use_tokens(victim) > MARGIN * self.next_use_tokens(newcomer)
