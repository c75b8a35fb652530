"""Tier bookkeeping that needs no GPU: the slot table under random moves, eviction policies, the O_DIRECT
cold reader (and its buffered fallback on tmpfs), and the fetch-or-compute cost model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moe_tier.errors import MoeTierError
from moe_tier.reader import ExpertId
from moe_tier.tiers.cold import ALIGN_BYTES, ColdReader
from moe_tier.tiers.links import MIN_SHARE, LinkSpeeds, Miss, balanced_share, decide
from moe_tier.tiers.planner_policy import PlannerPolicy
from moe_tier.tiers.slots import POLICIES, LfuPolicy, LruPolicy, Slot, SlotTable, Tier

EXPERTS = [ExpertId(layer, e) for layer in range(3) for e in range(8)]


def test_slot_table_invariants_under_random_place_and_evict():
    rng = np.random.default_rng(0)
    table = SlotTable(EXPERTS, {0: 5, 1: 3}, pinned=EXPERTS[::2])
    table.check()
    for _ in range(500):
        eid = EXPERTS[rng.integers(len(EXPERTS))]
        if table.tier(eid) is Tier.HOT:
            slot = table.evict(eid)
            assert table.tier(eid) is (Tier.WARM if eid in EXPERTS[::2] else Tier.COLD)
            assert slot.index in table.free[slot.gpu]
        else:
            gpu = int(rng.integers(2))
            if table.n_free(gpu):
                slot = table.place(eid, gpu)
                assert table.tier(eid) is Tier.HOT and table.holder[gpu][slot.index] == eid
        table.check()
        assert sum(len(table.hot_on(g)) + table.n_free(g) for g in (0, 1)) == 8


def test_slot_table_refuses_double_placement_and_full_gpu():
    table = SlotTable(EXPERTS, {0: 1}, pinned=[])
    assert table.place(EXPERTS[0], 0) == Slot(0, 0)
    with pytest.raises(AssertionError):
        table.place(EXPERTS[0], 0)
    with pytest.raises(AssertionError):
        table.place(EXPERTS[1], 0)


def test_check_catches_a_corrupted_table():
    table = SlotTable(EXPERTS, {0: 2}, pinned=[])
    table.place(EXPERTS[0], 0)
    table.free[0].append(0)  # a used slot put back on the free list
    with pytest.raises(AssertionError, match="free list"):
        table.check()


def test_lru_evicts_least_recent_and_lfu_least_frequent():
    a, b, c = EXPERTS[:3]
    lru, lfu = LruPolicy(), LfuPolicy()
    for eid in (a, a, a, b, c, b):
        lru.touch(eid)
        lfu.touch(eid)
    assert lru.victim([a, b, c]) == a
    assert lfu.victim([a, b, c]) == c
    assert lru.victim([b, c]) == c
    assert lru.victim([]) is None



def test_planner_policy_never_picks_a_protected_expert():
    rng = np.random.default_rng(1)
    policy = PlannerPolicy()
    for _ in range(40):  # tokens: two experts of each layer, layers in order
        for layer in range(3):
            for e in rng.choice(8, 2, replace=False):
                policy.touch(ExpertId(layer, int(e)))
        protected = {EXPERTS[i] for i in rng.choice(len(EXPERTS), 20, replace=False)}
        victim = policy.victim(e for e in EXPERTS if e not in protected)
        assert victim is not None and victim not in protected
    assert policy.victim([]) is None


def test_planner_policy_prefers_a_frequent_miss_to_a_cold_victim_and_not_the_reverse():
    policy = PlannerPolicy()
    hot, cold = ExpertId(1, 3), ExpertId(1, 5)
    policy.touch(cold)
    for _ in range(10):  # ten tokens that use `hot` at layer 1
        policy.touch(ExpertId(0, 0))
        policy.touch(hot)
    assert policy.next_use_tokens(hot) < policy.next_use_tokens(cold)
    assert policy.prefers(hot, cold)
    assert not policy.prefers(cold, hot)
    assert policy.victim([hot, cold]) == cold


def _live_hit_rate(policy, steps: list[list[list[ExpertId]]], n_slots: int) -> float:
    """DeviceMoE.account's rule on a SlotTable: use a step, touch its experts, then offer each miss the policy's
    victim among experts its layer did not use."""
    table = SlotTable(EXPERTS, {0: n_slots}, pinned=EXPERTS)
    hits = uses = 0
    for step in steps:
        hits += sum(eid in table.slot_of for wanted in step for eid in wanted)
        uses += sum(map(len, step))
        for wanted in step:
            for eid in wanted:
                policy.touch(eid)
        for wanted in step:
            for eid in wanted:
                if eid in table.slot_of:
                    continue
                if not table.n_free(0):
                    victim = policy.victim(e for e in table.hot_on(0) if e not in wanted)
                    if victim is None or not policy.prefers(eid, victim):
                        continue
                    table.evict(victim)
                    policy.forget(victim)
                table.place(eid, 0)
        table.check()
    return hits / uses


def test_planner_policy_keeps_a_skewed_hot_set_that_lru_thrashes():
    """Layer 0 uses experts 0 and 1 every token; layer 1 scans its 8 experts two at a time. With 3 slots, LRU
    gives each scanned pair a slot and so evicts a hot expert every token (misses at both layers); keeping the
    hot pair and leaving the scan in host memory hits half of all uses, which the planner's E[T] must find."""
    steps = [[[ExpertId(0, 0), ExpertId(0, 1)], [ExpertId(1, 2 * t % 8), ExpertId(1, (2 * t + 1) % 8)]]
             for t in range(200)]
    lru = _live_hit_rate(LruPolicy(), steps, n_slots=3)
    planner = _live_hit_rate(POLICIES["planner"](), steps, n_slots=3)
    assert planner > 0.45 and planner > lru + 0.2, (planner, lru)


def _file(directory: Path, n_bytes: int) -> tuple[Path, bytes]:
    data = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    path = directory / "experts.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("where,direct", [("disk", True), ("disk", False), ("tmpfs", True)])
def test_cold_reader_returns_exact_unaligned_ranges(tmp_path, where, direct):
    """Buffered mode is the fallback where O_DIRECT is refused (tmpfs before Linux 6.6)."""
    directory = tmp_path if where == "disk" else Path("/dev/shm")
    if where == "tmpfs" and not directory.is_dir():
        pytest.skip("no /dev/shm")
    path, data = _file(Path(directory), 3 * ALIGN_BYTES * 1000 + 123)
    try:
        reader = ColdReader(path, n_threads=3, try_direct=direct)
        assert reader.direct == direct or where == "tmpfs"
        ranges = [(0, 10), (4095, 2), (5000, 9 << 20), (len(data) - 77, 77), (123457, ALIGN_BYTES)]
        staging = np.empty(reader.staging_bytes(ranges), dtype=np.uint8)
        for (off, n), span in zip(ranges, reader.read(ranges, staging)):
            assert staging[span.start : span.start + span.n_bytes].tobytes() == data[off : off + n]
        with pytest.raises(MoeTierError, match="outside the file"):
            reader.read([(len(data) - 5, 10)], staging)
        with pytest.raises(ValueError, match="too small"):
            reader.read(ranges, staging[:100])
        reader.close()
    finally:
        if where == "tmpfs":
            os.unlink(path)


def test_cost_model_fetches_when_the_link_wins_and_computes_on_cpu_otherwise():
    fast_link = LinkSpeeds(h2d_bytes_per_s=100e9, disk_bytes_per_s=5e9, cpu_bytes_per_s=20e9)
    warm = [Miss(e, 100 << 20, Tier.WARM, 1) for e in EXPERTS[:4]]
    d = decide(warm, fast_link, can_fetch=10)
    assert len(d.fetch) == 4 and not d.cpu  # queued fetches still beat the CPU here
    slow_link = LinkSpeeds(h2d_bytes_per_s=1e9, disk_bytes_per_s=5e9, cpu_bytes_per_s=20e9)
    d = decide(warm, slow_link, can_fetch=10)
    assert len(d.cpu) == 4 and not d.fetch
    # With a balanced link and CPU, work spreads over both; slots bound the fetches.
    even = LinkSpeeds(h2d_bytes_per_s=20e9, disk_bytes_per_s=5e9, cpu_bytes_per_s=20e9)
    d = decide(warm, even, can_fetch=10)
    assert len(d.fetch) == 2 and len(d.cpu) == 2
    d = decide(warm, fast_link, can_fetch=1)
    assert len(d.fetch) == 1 and len(d.cpu) == 3
    # Many tokens make the CPU (one weight pass per token) lose to one copy.
    many = [Miss(EXPERTS[0], 100 << 20, Tier.COLD, 64)]
    assert decide(many, slow_link, can_fetch=1).fetch


def test_cpu_rate_is_timed_over_every_sampled_expert_in_turn(monkeypatch):
    """measure_cpu passes one token through each expert once a round (a cache cannot serve the repeats) and
    divides all their bytes by a round's time."""
    from types import SimpleNamespace

    from moe_tier.tiers import links

    def expert(n_bytes):
        part = SimpleNamespace(data=np.zeros(n_bytes, np.uint8))
        return SimpleNamespace(gate=part, up=part, down=part)

    experts = [expert(1000), expert(3000)]
    seen = []
    monkeypatch.setattr(links, "swiglu_ffn", lambda x, gate, up, down: seen.append(gate.data.nbytes))
    clock = iter(np.arange(0.0, 100.0, 0.5))  # every round takes 0.5 s
    monkeypatch.setattr(links.time, "perf_counter", lambda: float(next(clock)))
    rate = links.measure_cpu(experts, n_embd=8, repeats=3)
    assert seen == [1000, 3000] * 4  # a warm-up round, then three timed ones
    assert rate == pytest.approx(3 * 4000 / 0.5)


def test_the_cpu_share_balances_the_measured_rates_and_is_off_for_a_busy_cpu():
    assert balanced_share(55e9, 55e9) == 0.5
    assert abs(balanced_share(20e9, 60e9) - 0.25) < 1e-12
    assert balanced_share(3.9e9, 55e9) == 0.0 < MIN_SHARE
