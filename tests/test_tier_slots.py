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
from moe_tier.tiers.slots import LfuPolicy, LruPolicy, Slot, SlotTable, Tier

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


def test_slot_table_places_into_a_chosen_free_slot():
    table = SlotTable(EXPERTS, {0: 3}, pinned=[])
    assert table.place(EXPERTS[0], 0, index=2) == Slot(0, 2)
    with pytest.raises(ValueError):
        table.place(EXPERTS[1], 0, index=2)  # taken
    table.check()


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
