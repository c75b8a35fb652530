"""The compiled planner: misses split between link and CPU, evictions by expected next use, idle-only prefetch."""

from __future__ import annotations

import numpy as np

from router_predict.next_visit import DECAY, features, forget
from router_predict.online import update
from router_predict.planner import BYPASS, FETCH, HIT, next_use_steps, plan_step
from router_predict.policies import LRU, CacheState, Planner
from router_predict.replay import CacheConfig, CostModel, replay, tuning_split
from router_predict.trace import Trace

L, E, K, D = 4, 8, 2, 2
MB = 2**20


def setup(resident, slots=4, n_gpu=1):
    X = L * E
    state = CacheState.preloaded(n_gpu, slots, np.array(resident, int), np.full(X, MB, np.int64), np.zeros(X, bool))
    return state


def call(state, layer, needed, ahead=None, recent=None, h2d=100 * MB, cpu=100 * MB, gpu_step_s=0.0, backlog=None,
         max_prefetch=4, share=0.0, admit_margin=1.0, link_value=0.0):
    ahead = np.full((D, E), 0.25, np.float32) if ahead is None else ahead
    recent = np.full((L, E), 0.25, np.float32) if recent is None else recent
    actions, prefetch = np.empty(len(needed), np.int8), np.empty(max_prefetch, np.int64)
    backlog = np.zeros(state.slot_expert.shape[0]) if backlog is None else backlog
    n = plan_step(layer, np.array(needed, np.int64), ahead, recent, state.slot_expert, state.expert_slot,
                  state.remaining_bytes, state.on_disk, state.expert_bytes, float(h2d), float(cpu), 10.0 * MB,
                  share, gpu_step_s, backlog, 1.0, admit_margin, link_value, actions, prefetch)
    state.check()
    return actions.tolist(), prefetch[:n].tolist()


def test_expected_next_use():
    ahead = np.zeros((D, E), np.float32)
    ahead[0, 3] = 1.0
    recent = np.full((L, E), 0.5, np.float32)
    assert next_use_steps(1 * E + 3, 0, ahead, recent) == 1.0  # certain at the next layer
    assert next_use_steps(1 * E + 4, 0, ahead, recent) > L  # ruled out there: next token at the earliest
    assert next_use_steps(0 * E + 3, 0, ahead, recent) == L + 0.5 * L / 0.5  # this layer: next token, p = 0.5


def test_free_slots_take_every_miss_whatever_the_rates():
    """Caching a miss costs the step nothing (it runs uncached while its copy goes on behind), so a free slot
    takes it however the link and the CPU compare."""
    state = setup([0, 1])
    actions, _ = call(state, 0, [0, 1])
    assert actions == [HIT, HIT]
    for h2d, cpu in ((100 * MB, 100 * MB), (100 * MB, 1 * MB), (1 * MB, 100 * MB)):
        state = setup([0, 1])
        actions, _ = call(state, 0, [2, 3], h2d=h2d, cpu=cpu)
        assert actions == [FETCH, FETCH]
        assert state.expert_slot[2] >= 0 and state.expert_slot[3] >= 0


def test_the_miss_most_likely_back_takes_the_free_slot():
    recent = np.full((L, E), 0.25, np.float32)
    recent[0, 2], recent[0, 3] = 0.9, 0.05  # 2 is likely again next token, 3 is not
    for needed in ([2, 3], [3, 2]):
        state = setup([1 * E, 1 * E + 1], slots=3)  # one free slot; the residents are back before 3 would be
        actions, _ = call(state, 0, needed, recent=recent)
        assert dict(zip(needed, actions)) == {2: FETCH, 3: BYPASS}


def test_prefetch_that_lands_after_its_layer_evicts_nothing():
    ahead = np.zeros((D, E), np.float32)
    ahead[0, 5] = 0.9  # layer 1, expert 5 is likely next; its copy takes 10 ms
    state = setup([0, 1, 2, 3])  # full: 2 and 3 are worth keeping until the next token
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, gpu_step_s=0.015)
    assert prefetch == [1 * E + 5]  # lands within this step
    state = setup([0, 1, 2, 3])
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, gpu_step_s=0.005)
    assert prefetch == []  # would land after layer 1 ran: no better than what it evicts


def test_never_evicts_what_the_layer_needs():
    state = setup([0, 1, 2, 3], slots=4)  # full; the step needs 0 and 9
    recent = np.full((L, E), 0.25, np.float32)
    recent[0, 0] = 1e-6  # 0 looks worthless afterwards, but it is needed now
    recent[1, 1] = 0.9  # 9 is back sooner than the other residents: worth a slot
    actions, _ = call(state, 0, [0, 9], recent=recent, cpu=1.0)
    assert actions == [HIT, FETCH]
    assert state.expert_slot[0] >= 0 and state.expert_slot[9] >= 0


def test_miss_expected_back_later_than_every_victim_is_staged_evicting_nothing():
    state = setup([0, 1, 2, 3], slots=4)  # full; layer 0 needs 4, whose next use is far off
    recent = np.full((L, E), 0.25, np.float32)
    recent[0, 4] = 0.01
    ahead = np.zeros((D, E), np.float32)
    ahead[0, 5] = 0.9  # a prefetch candidate for the link time the step leaves idle
    before = state.slot_expert.copy()
    actions, prefetch = call(state, 0, [0, 4], ahead=ahead, recent=recent, cpu=1 * MB, gpu_step_s=0.015)
    assert actions == [HIT, BYPASS]
    assert (state.slot_expert == before).all() and state.expert_slot[4] < 0
    # staged, not run on the 1 MiB/s CPU: its 10 ms of link go first, so a prefetch for layer 1 would land after
    # that layer ran (a 15 ms step), no better than what it evicts
    assert prefetch == []
    state = setup([0, 1, 2, 3], slots=4)
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, recent=recent, cpu=1 * MB, gpu_step_s=0.015)
    assert prefetch == [1 * E + 5]  # the same step with no miss: the link is free and the prefetch lands in time
    recent[0, 4] = 0.9  # back next token, sooner than any resident but 0: it takes a slot
    actions, _ = call(state, 0, [0, 4], recent=recent, cpu=1 * MB)
    assert actions == [HIT, FETCH]


def test_valued_link_time_runs_a_refused_miss_whole_on_the_cpu_for_a_prefetch():
    """Staging a refused miss ends the step in 5 ms but fills the link; whole on the CPU it ends in 10 ms and leaves
    the link idle for a prefetch. With link time valued at 2 step seconds a second, the planner takes the latter."""
    recent = np.full((L, E), 0.25, np.float32)
    recent[0, 4] = 0.01  # refused: back later than every resident
    ahead = np.zeros((D, E), np.float32)
    ahead[0, 5] = 0.9
    for link_value, want in ((0.0, []), (2.0, [1 * E + 5])):
        state = setup([0, 1, 2, 3])
        actions, prefetch = call(state, 0, [0, 4], ahead=ahead, recent=recent, share=0.5, gpu_step_s=0.001,
                                 link_value=link_value)
        assert actions == [HIT, BYPASS] and prefetch == want


def test_prefetch_only_into_idle_link_time():
    ahead = np.zeros((D, E), np.float32)
    ahead[0, 5] = 0.9  # layer 1, expert 5 is likely next
    state = setup([0, 1])
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, gpu_step_s=0.0)
    assert prefetch == []  # all hits and no GPU time: the step leaves no idle link time
    state = setup([0, 1])
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, gpu_step_s=0.015)  # 1.5 MiB of idle link
    assert prefetch[0] == 1 * E + 5 and len(prefetch) <= 2
    assert state.remaining_bytes[1 * E + 5] == MB  # in flight, not ready
    state = setup([0, 1])
    _, prefetch = call(state, 0, [0, 1], ahead=ahead, gpu_step_s=0.015, backlog=np.array([0.02]))
    assert prefetch == []  # the queue already fills the idle time


def test_planner_beats_lru_when_layers_predict_each_other():
    """Layer l+1 repeats layer l's experts; with idle link time the planner fetches them ahead."""
    rng = np.random.default_rng(0)
    n, Lt = 200, 8
    first = rng.integers(0, E, (n, 1))
    ids = np.repeat(np.stack([first[:, 0], (first[:, 0] + 1) % E], -1)[:, None], Lt, 1)
    t = Trace(fingerprint="f", arch="llama", n_layer=Lt, n_expert=E, n_expert_used=2,
              moe_layers=np.arange(Lt, dtype=np.int32), expert_ids=ids.astype(np.int16),
              weights=np.full(ids.shape, 0.5, np.float32), is_prompt=np.zeros(n, bool),
              sequence=(np.arange(n) >= n // 2).astype(np.int32), position=np.arange(n, dtype=np.int32),
              token=np.full(n, -1, np.int32))
    train, test = t.select(t.sequence == 0), t.select(t.sequence == 1)
    cost = CostModel(h2d_bytes_per_s=100 * MB, cpu_bytes_per_s=20 * MB, disk_bytes_per_s=10 * MB,
                     gpu_bytes_per_s=1000 * MB, dense_layer_bytes=30 * MB)  # 30 ms GPU per layer: 3 MiB idle
    eb = np.full(Lt * E, MB, np.int64)
    for cache in (CacheConfig(1, 24), CacheConfig(2, 12)):  # two GPUs: two links for the prefetches
        lru = replay(LRU(), test, train, cost, cache, eb)
        planner = replay(Planner(cost), test, train, cost, cache, eb)
        assert planner.hit_rate > lru.hit_rate + 0.3
        assert planner.prefetch_used > 0.4  # more idle link time also buys less likely experts


def test_next_token_layers_use_the_visit_prediction_not_this_tokens_lookahead():
    ahead = np.zeros((D, E), np.float32)  # nothing predicted for this token's later layers
    recent = np.full((L, E), 0.5, np.float32)
    # from the last layer, layer 1 of the next token is 2 steps away; this token's lookahead says nothing of it
    assert next_use_steps(1 * E + 3, L - 1, ahead, recent) == 2 + 0.5 * L / 0.5


def test_last_layer_prefetches_for_the_next_token():
    recent = np.full((L, E), 0.05, np.float32)
    recent[0, 6] = 0.9  # layer 0 almost always picks expert 6
    state = setup([3 * E, 3 * E + 1, 1 * E, 1 * E + 1, 2 * E, 2 * E + 1], slots=6)
    actions, prefetch = call(state, L - 1, [3 * E, 3 * E + 1], recent=recent, gpu_step_s=0.015)
    assert actions == [HIT, HIT] and prefetch[0] == 0 * E + 6  # 1.5 MiB of idle link after the last layer


def test_experts_left_uncached_are_prefetch_candidates():
    recent = np.full((L, E), 0.05, np.float32)
    recent[0, 5], recent[1, :2], recent[2, :2] = 0.3, 0.2, 0.2  # 5 recurs; the residents are back a bit sooner
    state = setup([1 * E, 1 * E + 1, 2 * E, 2 * E + 1])
    # admission 2x refuses both misses, yet 5 is back sooner than the residents: the idle link may fetch it ahead
    actions, prefetch = call(state, 0, [5, 7], recent=recent, h2d=1 * MB, cpu=100 * MB, admit_margin=2.0)
    assert actions == [BYPASS, BYPASS]  # a slow link: both run on the CPU, leaving the link idle
    assert 5 in prefetch and 7 not in prefetch


def test_tuning_split_keeps_tuning_tokens_apart_from_fitting_tokens():
    def trace(sequence):
        n = len(sequence)
        ids = np.zeros((n, L, K), np.int16)
        ids[..., 1] = 1
        return Trace(fingerprint="f", arch="llama", n_layer=L, n_expert=E, n_expert_used=K,
                     moe_layers=np.arange(L, dtype=np.int32), expert_ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
                     is_prompt=np.zeros(n, bool), sequence=np.asarray(sequence, np.int32),
                     position=np.arange(n, dtype=np.int32), token=np.full(n, -1, np.int32))

    assert tuning_split(trace([0] * 10)).tolist() == [True] * 5 + [False] * 5  # one sequence: its two halves
    mask = tuning_split(trace([0, 0, 1, 1, 2, 2, 3, 3]))
    assert mask.tolist() == [True] * 4 + [False] * 4  # whole sequences on each side


def test_online_update_matches_its_numpy_reference():
    """The compiled prediction update: ahead from prior, cross-layer and next visits, gate lookahead mixed in,
    and this layer's next visit from the mixture or the fitted weights, the next token's gate lookahead mixed in."""
    rng = np.random.default_rng(0)
    prior = rng.dirichlet(np.ones(E), L).astype(np.float32)
    cross = rng.dirichlet(np.ones(E), (D, L, E)).astype(np.float32)
    reuse = rng.dirichlet(np.ones(E), (L, E)).astype(np.float32)
    mix = np.array([[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    gate = rng.dirichlet(np.ones(E), 1).astype(np.float32)  # one row: mixed into layer 2 only, not layer 3
    experts, shares = np.array([3, 5]), np.array([0.75, 0.25])
    sel = np.zeros(E)
    sel[experts] = shares
    layer, decay, w_online, w_recency = 1, 0.8, 0.4, 0.3
    next_rows = (np.zeros(0, np.float32), rng.dirichlet(np.ones(E)).astype(np.float32))  # none, then one
    for visit_weights, next_gate in zip((np.zeros(0), rng.normal(0, 1, 4 + len(DECAY))), next_rows):
        counts, decayed = prior + 1.0, prior.copy()
        forgetting = np.repeat(prior[None], len(DECAY), 0)
        recent, ahead = prior.copy() * 2, np.zeros((D, E), np.float32)
        want_ahead = np.zeros((D, E))
        for d in (1, 2):
            m = layer + d
            want_ahead[d - 1] = mix[d - 1] @ [prior[m], sel @ cross[d - 1, layer], recent[m]]
        want_ahead[0] = 0.5 * np.minimum(gate[0] * K, 1) + 0.5 * want_ahead[0]
        chose = (sel > 0).astype(float)
        reuse_now = sel @ reuse[layer]
        if visit_weights.size:  # the fitting path's own features and forgetting, so the two orders agree
            f = forgetting[:, layer].astype(float)
            forget(f, chose)
            want_recent = features(prior[layer], chose, reuse_now, f) @ visit_weights
        else:
            c = counts[layer] + chose
            d_row = decay * decayed[layer] + (1 - decay) * chose
            want_recent = (1 - w_recency) * (w_online * c * K / c.sum() + (1 - w_online) * reuse_now) + \
                w_recency * d_row
        if next_gate.size:  # the next token's gate lookahead, mixed into this layer's next visit
            want_recent = 0.4 * np.minimum(next_gate * K, 1) + 0.6 * want_recent
        update(layer, experts, shares, prior, cross, mix, reuse, gate, 0.5, next_gate, 0.4, counts, decayed, decay,
               w_online, w_recency, visit_weights, forgetting, DECAY, recent, ahead)
        np.testing.assert_allclose(ahead[:2], want_ahead[:2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(recent[layer], want_recent, rtol=1e-5, atol=1e-6)
