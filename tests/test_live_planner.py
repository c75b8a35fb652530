"""The live planner's bookkeeping against a SlotTable, without CUDA: plan_step's decisions (hit, fetch into the slot
it chose, uncached, prefetch) keep its arrays and the table the engine reads the same."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moe_tier.reader import ExpertId
from moe_tier.tiers.links import LinkSpeeds
from moe_tier.tiers.live_planner import LIVE_SETTINGS, LivePlanner
from moe_tier.tiers.slots import SlotTable

L, E, K = 4, 8, 2
MOE_LAYERS = [1, 2, 3, 4]  # a dense first layer: positions differ from layer numbers
EXPERTS = [ExpertId(m, e) for m in MOE_LAYERS for e in range(E)]
SKEW = np.r_[[0.3] * 3, [0.02] * 5]  # three favourites, five rare ones
FAST = LinkSpeeds(h2d_bytes_per_s=1e9, disk_bytes_per_s=1e9, cpu_bytes_per_s=1e8)


def make(n_slots: dict[int, int], hot: list[ExpertId], pinned=EXPERTS, prior=None, settings=LIVE_SETTINGS):
    table = SlotTable(EXPERTS, n_slots, pinned)
    for i, eid in enumerate(hot):
        table.place(eid, i % len(n_slots))
    planner = LivePlanner(dict.fromkeys(EXPERTS, 1000), MOE_LAYERS, E, K, table, prior, settings)
    planner.check()
    return table, planner


def test_random_layer_steps_keep_the_planner_and_the_table_consistent():
    table, planner = make({0: 3, 1: 5}, EXPERTS[:6], pinned=EXPERTS[::2] + EXPERTS[1:8],  # unequal GPUs, some cold
                          settings=replace(LIVE_SETTINGS, admit_margin=1.0))  # some misses admitted too
    rng = np.random.default_rng(0)
    in_flight, seen = set(), {"hit": 0, "placed": 0, "uncached": 0, "prefetch": 0, "evicted": 0}
    for token in range(60):
        for layer in MOE_LAYERS:
            tokens = {int(e): 1 for e in rng.choice(E, K, replace=False, p=SKEW)}
            plan = planner.step(layer, tokens, FAST, step_s=2e-6)
            for eid in in_flight:  # the copies issued a step earlier land
                if eid in table.slot_of:
                    planner.landed(eid)
            in_flight = {e for e, _ in plan.prefetch}
            for eid, slot in plan.placed:
                planner.landed(eid)  # the read-back path waits for its fetches
            decided = [*plan.hits, *plan.waits, *(e for e, _ in plan.placed), *plan.uncached]
            assert sorted(decided) == sorted(ExpertId(layer, e) for e in tokens)
            for eid, slot in (*plan.placed, *plan.prefetch):
                assert table.slot_of[eid] == slot
            for eid, slot in plan.evicted:
                assert eid not in decided and table.slot_of.get(eid) != slot  # never one this layer needs
            for eid in plan.uncached:  # moves only as a prefetch, for the next token
                assert eid not in table.slot_of or eid in {e for e, _ in plan.prefetch}
            for eid, _ in plan.prefetch:
                assert eid in table.pinned  # never a cold expert: a prefetch copies a pinned blob
            seen["hit"] += len(plan.hits)
            for k in ("placed", "uncached", "prefetch", "evicted"):
                seen[k] += len(getattr(plan, k))
            table.check()
            planner.check()
            assert len(table.slot_of) == 8  # slots stay full: a placement always replaces
    assert all(seen.values()), seen


def test_a_miss_the_planner_refuses_runs_uncached_and_moves_nothing():
    hot = [ExpertId(1, e) for e in range(4)]
    prior = {eid: (0.5 if eid in hot else 0.01) for eid in EXPERTS}
    table, planner = make({0: 4}, hot, prior=prior)
    before = dict(table.slot_of)
    plan = planner.step(1, {6: 1, 0: 1}, FAST, step_s=0.0)  # no idle link: no prefetch either
    assert plan.uncached == [ExpertId(1, 6)] and plan.hits == [ExpertId(1, 0)]
    assert not plan.placed and not plan.evicted and not plan.prefetch
    assert table.slot_of == before
    planner.check()


def test_a_read_back_step_over_several_tokens_admits_every_miss_it_has_a_slot_for():
    hot = [ExpertId(1, e) for e in range(4)]
    prior = {eid: (0.5 if eid in hot else 0.01) for eid in EXPERTS}
    table, planner = make({0: 4}, hot, prior=prior)
    plan = planner.step(2, {6: 7, 7: 3}, FAST, step_s=0.0)  # prefill: CPU time grows with the tokens
    assert sorted(e for e, _ in plan.placed) == [ExpertId(2, 6), ExpertId(2, 7)] and len(plan.evicted) == 2
    planner.check()
    table, planner = make({0: 4}, hot, prior=prior)
    assert planner.step(2, {6: 7, 7: 3}, FAST, step_s=0.0, read_back=False).uncached  # decode stages them


def test_a_prefetch_is_waited_for_until_it_lands_then_hits():
    table, planner = make({0: 6}, [ExpertId(1, 0)], settings=replace(LIVE_SETTINGS, max_prefetch=4))
    plan = planner.step(1, {0: 1, 1: 1}, FAST, step_s=1e-3)  # a long step: idle link time for 4 copies
    assert plan.hits == [ExpertId(1, 0)] and len(plan.prefetch) == 4 and not plan.evicted
    fetched = {e for e, _ in plan.placed}
    ahead = [e for e, _ in plan.prefetch if e not in fetched]
    planner.check()
    target = next(e for e in ahead if e.layer > 1)
    later = planner.step(target.layer, {target.expert: 1}, FAST, step_s=1e-3)
    assert later.waits == [target]  # in its slot, its copy under way
    planner.landed(target)
    planner.check()
    assert planner.step(target.layer, {target.expert: 1}, FAST, step_s=1e-3).hits == [target]


def test_decode_on_the_device_prefetches_nothing():
    """Its misses are staged through the link a prefetch would take (LivePlanner.step)."""
    table, planner = make({0: 6}, [ExpertId(1, 0)], settings=replace(LIVE_SETTINGS, max_prefetch=4))
    plan = planner.step(1, {0: 1, 1: 1}, FAST, step_s=1e-3, read_back=False)  # the idle link of the test above
    assert plan.hits == [ExpertId(1, 0)] and not plan.prefetch
    assert {e for e, _ in plan.placed} == {ExpertId(1, 1)}  # a free slot still takes the miss
    planner.check()


def test_step_time_is_measured_between_ticks():
    _, planner = make({0: 2}, [])
    assert planner.tick(1) == 0.0  # nothing measured yet
    planner._last_tick -= 0.004
    assert 0.001 <= planner.tick(4) < 0.01


def _device_hit_rate(steps: list[list[list[int]]], n_slots: int, planner: bool) -> float:
    """DeviceMoE.account's rule on a SlotTable of layers 1 and 2: use a step (hits are the slots whose copies
    landed), then the planner's promotions and prefetches (copies land by the next step), or LRU's (every miss
    takes the least recently used slot its layer did not use)."""
    experts = [ExpertId(m, e) for m in (1, 2) for e in range(E)]
    table = SlotTable(experts, {0: n_slots}, pinned=experts)
    live = LivePlanner(dict.fromkeys(experts, 1000), [1, 2], E, K, table) if planner else None
    order: list[ExpertId] = []  # LRU: least recent first
    hits = uses = 0
    for step in steps:
        ready = {e for e in table.slot_of if live is None or live.state.remaining_bytes[live.flat(e)] == 0}
        for layer, wanted in zip((1, 2), step):
            hits += sum(ExpertId(layer, e) in ready for e in wanted)
            uses += len(wanted)
            if live is not None:
                live.step(layer, dict.fromkeys(wanted, 1), FAST, step_s=0.0, read_back=False)
                continue
            for e in wanted:
                eid = ExpertId(layer, e)
                order = [o for o in order if o != eid] + [eid]
                if eid in table.slot_of:
                    continue
                if not table.n_free(0):
                    table.evict(next(o for o in order if o in table.slot_of
                                     and not (o.layer == layer and o.expert in wanted)))
                table.place(eid, 0)
        for eid in list(table.slot_of) if live is not None else ():
            live.landed(eid)
        table.check()
    return hits / uses


def test_the_live_planner_keeps_a_skewed_hot_set_that_lru_thrashes():
    """Layer 1 uses experts 0 and 1 every token; layer 2 scans its 8 experts two at a time. With 3 slots, LRU
    gives each scanned pair a slot and so evicts a hot expert every token; keeping the hot pair and leaving the
    scan uncached hits half of all uses, which the planner's E[T] and admission margin must find."""
    steps = [[[0, 1], [2 * t % 8, (2 * t + 1) % 8]] for t in range(200)]
    lru = _device_hit_rate(steps, n_slots=3, planner=False)
    planner = _device_hit_rate(steps, n_slots=3, planner=True)
    assert planner > 0.45 and planner > lru + 0.2, (planner, lru)


def test_a_read_back_step_admits_no_miss_where_the_cpu_runs_it_sooner_than_the_link_copies_it():
    table, planner = make({0: 4}, [])
    slow_link = LinkSpeeds(h2d_bytes_per_s=1e3, disk_bytes_per_s=1e9, cpu_bytes_per_s=1e9)
    plan = planner.step(1, {6: 3, 7: 1}, slow_link, step_s=0.0)
    assert sorted(plan.uncached) == [ExpertId(1, 6), ExpertId(1, 7)] and not plan.placed  # free slots and all
    planner.check()  # (the link's idle time while the CPU runs them may still carry a prefetch)
