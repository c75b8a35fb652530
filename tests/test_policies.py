"""Cache policies and the replay cost model on routing small enough to check by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from router_predict.planner import BYPASS, CPU, FETCH, HIT
from router_predict.policies import LFRU, LFU, LRU, Belady, CacheState, Planner, StaticPinning
from router_predict.replay import CacheConfig, CostModel, compare, replay
from router_predict.trace import Trace

MB = 2**20
COST = CostModel(h2d_bytes_per_s=100 * MB, cpu_bytes_per_s=50 * MB, disk_bytes_per_s=10 * MB,
                 gpu_bytes_per_s=1000 * MB, dense_layer_bytes=0)


def one_layer(seq: list[int], n_expert: int = 4) -> Trace:
    """A one-layer, top-1 trace: the expert each token picks."""
    n = len(seq)
    return Trace(fingerprint="f", arch="llama", n_layer=1, n_expert=n_expert, n_expert_used=1,
                 moe_layers=np.zeros(1, np.int32), expert_ids=np.array(seq, np.int16).reshape(n, 1, 1),
                 weights=np.ones((n, 1, 1), np.float32), is_prompt=np.zeros(n, bool), sequence=np.zeros(n, np.int32),
                 position=np.arange(n, dtype=np.int32), token=np.full(n, -1, np.int32))


def run_steps(policy, seq, slots, preload=(), train=None):
    """The actions the policy takes on each token, starting from `preload` in the slots."""
    E = max(seq + list(preload)) + 1
    state = CacheState.preloaded(1, slots, np.array(list(preload), int), np.full(E, MB, np.int64),
                                 np.zeros(E, bool))
    policy.start(state, train or one_layer(seq, E))
    out = []
    for x in seq:
        actions, _ = policy.step(0, np.array([x]), np.ones(1, np.float32), state, False)
        state.remaining_bytes[:] = 0
        state.check()
        out.append(int(actions[0]))
    return out, state


def test_lru_evicts_least_recent():
    actions, state = run_steps(LRU(), [0, 1, 0, 2, 1], slots=2)
    assert actions == [FETCH, FETCH, HIT, FETCH, FETCH]  # 2 evicts 1 (older than 0); 1 then evicts 0
    assert sorted(state.slot_expert.ravel().tolist()) == [1, 2]


def test_lfu_keeps_the_frequent():
    actions, _ = run_steps(LFU(), [0, 0, 0, 1, 2, 0], slots=2)
    assert actions == [FETCH, HIT, HIT, FETCH, FETCH, HIT]  # 2 evicts 1, never 0


def test_lfru_forgets_old_frequency():
    seq = [0] * 6 + [1, 2] * 20 + [0]
    fast, _ = run_steps(LFRU(half_life_tokens=1), seq, slots=2)
    slow, _ = run_steps(LFRU(half_life_tokens=1000), seq, slots=2)
    assert fast[-3:] == [HIT, HIT, FETCH]  # 0's early uses decayed away: 1 and 2 hold the slots
    assert slow[6:10] == [FETCH, FETCH, FETCH, FETCH]  # 0 too valuable to lose: 1 and 2 share one slot


def test_static_pinning_computes_misses_on_cpu():
    actions, state = run_steps(StaticPinning(), [0, 1, 2, 1], slots=1, preload=[1])
    assert actions == [CPU, HIT, CPU, HIT]
    assert state.slot_expert.ravel().tolist() == [1]


def test_belady_evicts_furthest_next_use_and_bypasses():
    seq = [0, 1, 2, 0, 1, 3, 0, 1, 2, 2]
    actions, _ = run_steps(Belady(one_layer(seq)), seq, slots=2)
    # 2 first returns after 0 and 1 do, 3 never: bypass both; at the end 2 replaces 0 (never used again)
    assert actions == [FETCH, FETCH, BYPASS, HIT, HIT, BYPASS, HIT, HIT, FETCH, HIT]
    actions, _ = run_steps(Belady(one_layer(seq), allow_bypass=False), seq, slots=2)
    # MIN must cache every miss: 2 evicts 1 (next used at 4, 0 at 3), 1 evicts 2, 3 evicts 1, ...
    assert actions == [FETCH, FETCH, FETCH, HIT, FETCH, FETCH, HIT, FETCH, FETCH, HIT]


@pytest.mark.parametrize("seed", range(3))
def test_belady_bounds_every_policy(seed):
    rng = np.random.default_rng(seed)
    L, E, n = 4, 8, 120
    ids = np.stack([np.stack([rng.choice(E, 2, replace=False, p=np.arange(1, E + 1) / 36) for _ in range(L)])
                    for _ in range(n)])
    t = Trace(fingerprint="f", arch="llama", n_layer=L, n_expert=E, n_expert_used=2,
              moe_layers=np.arange(L, dtype=np.int32), expert_ids=ids.astype(np.int16),
              weights=np.full(ids.shape, 0.5, np.float32), is_prompt=np.zeros(n, bool),
              sequence=(np.arange(n) >= n // 2).astype(np.int32), position=np.arange(n, dtype=np.int32),
              token=np.full(n, -1, np.int32))
    train, test = t.select(t.sequence == 0), t.select(t.sequence == 1)
    eb = np.full(L * E, MB, np.int64)
    results = compare(train, test, COST, CacheConfig(1, 12), eb)
    belady = results[-1]
    assert belady.policy.startswith("Belady")
    for r in results[:-1]:
        if not r.policy.startswith("planner"):  # the planner prefetches, so demand caching does not bound it
            assert r.hit_rate <= belady.hit_rate + 1e-12, r.policy


def test_replay_cost_model_by_hand():
    """Two layers of one expert each, never cached: every step fetches 1 MiB at 100 MiB/s (10 ms)."""
    seq = [0, 1, 2, 3]
    t = one_layer(seq)
    eb = np.full(4, MB, np.int64)
    lru = replay(LRU(), t, one_layer([0]), COST, CacheConfig(1, 1), eb)
    # preloaded with expert 0 (the fitting trace's favourite): one hit, three 10 ms fetches + 1 ms GPU each
    assert lru.hit_rate == 0.25
    assert lru.h2d_bytes_per_token == pytest.approx(3 * MB / 4)
    step_s = [MB / COST.gpu_bytes_per_s] + [MB / COST.h2d_bytes_per_s] * 3
    assert lru.tokens_per_s == pytest.approx(4 / sum(step_s))
    pinned = replay(StaticPinning(), t, one_layer([0]), COST, CacheConfig(1, 1), eb)
    assert pinned.cpu_share == 0.75 and pinned.h2d_bytes_per_token == 0
    assert pinned.tokens_per_s == pytest.approx(4 / (MB / COST.gpu_bytes_per_s + 3 * MB / COST.cpu_bytes_per_s))


def test_cold_experts_pay_the_disk_read():
    t = one_layer([1, 2, 3])
    eb = np.full(4, MB, np.int64)
    warm = replay(StaticPinning(), t, one_layer([0]), COST, CacheConfig(1, 1), eb)
    cold = replay(StaticPinning(), t, one_layer([0]), COST, CacheConfig(1, 1, host_bytes=2 * MB), eb)
    # with room for two experts in host memory, two of 1, 2, 3 come from disk at 10 MiB/s first
    assert 3 / warm.tokens_per_s == pytest.approx(3 * MB / COST.cpu_bytes_per_s)
    assert 3 / cold.tokens_per_s == pytest.approx(3 * MB / COST.cpu_bytes_per_s + 2 * MB / COST.disk_bytes_per_s)


def test_planner_replay_keeps_the_slot_table_consistent():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 6, 200).tolist()
    planner = Planner(COST)
    _, state = run_steps(planner, seq, slots=3, train=one_layer(seq[:100], 6))
    state.check()


def test_a_bypassed_miss_is_staged_when_the_link_is_faster():
    """Belady bypasses 2 and 3 (preloaded 0 and 1 come back first) and caches 2 at the end. Each miss is staged
    through the link, evicting nothing, with the CPU computing its share meanwhile: 1 MiB / (link + CPU rate). The
    cached one's copy into its slot runs behind its step: it is a hit at the next token."""
    seq = [0, 1, 2, 0, 1, 3, 0, 1, 2, 2]
    t, eb = one_layer(seq), np.full(4, MB, np.int64)
    share = 1 / 3  # the CPU's 50 MiB/s against the link's 100: both parts take 1/150 s
    r = replay(Belady(t), t, one_layer([0, 1]), replace(COST, stage_cpu_share=share), CacheConfig(1, 2), eb)
    assert r.hit_rate == 0.7 and r.staged_share == 0.3 and r.cpu_share == 0  # staged still counts as a miss
    assert r.h2d_bytes_per_token == pytest.approx((3 * (1 - share) * MB + MB) / 10)  # staged parts and one promotion
    step_s = [MB / COST.gpu_bytes_per_s] * 7 + [1 / 150] * 3
    assert r.tokens_per_s == pytest.approx(10 / sum(step_s))
    slow_link = replay(Belady(t), t, one_layer([0, 1]), replace(COST, h2d_bytes_per_s=10 * MB), CacheConfig(1, 2), eb)
    assert slow_link.cpu_share == 0.2 and slow_link.staged_share == 0  # the bypassed ones: the CPU finishes first
    assert slow_link.hit_rate == 0.7 and slow_link.h2d_bytes_per_token == pytest.approx(MB / 10)  # the cached one


def test_valued_link_time_runs_bypassed_misses_on_the_cpu_and_cached_ones_by_waiting():
    """The same replay with the link valued at 3 step seconds a second (what a planner's prefetches would make of
    it): the bypassed misses run whole on the CPU (20 ms each, not 1/150 s staged plus 3 x its 1/150 s of link),
    the cached one waits for its 10 ms copy instead of staging and promoting (1/150 s, then 10 ms of link behind
    it). The step times count the slower paths."""
    seq = [0, 1, 2, 0, 1, 3, 0, 1, 2, 2]
    t, eb = one_layer(seq), np.full(4, MB, np.int64)
    belady = Belady(t)
    belady.link_value = 3.0
    r = replay(belady, t, one_layer([0, 1]), replace(COST, stage_cpu_share=1 / 3), CacheConfig(1, 2), eb)
    assert r.hit_rate == 0.7 and r.cpu_share == 0.2 and r.staged_share == 0
    assert r.h2d_bytes_per_token == pytest.approx(MB / 10)  # the cached one's copy, once
    step_s = [MB / COST.gpu_bytes_per_s] * 7 + [MB / COST.cpu_bytes_per_s] * 2 + [MB / COST.h2d_bytes_per_s]
    assert r.tokens_per_s == pytest.approx(10 / sum(step_s))
