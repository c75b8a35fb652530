"""The fitted next-visit chance: it learns how sticky routing is from token to token, and the planner uses it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from router_predict.next_visit import NextVisit, upcoming
from router_predict.policies import Planner, PlannerSettings
from router_predict.predictors import FrequencyPrior, TokenReuse, chosen, recall_at
from router_predict.replay import CacheConfig, CostModel, replay
from router_predict.trace import Trace

L, E, K = 3, 8, 2
MB = 2**20


def sticky(n: int, seed: int, stay: float = 0.85) -> Trace:
    """Each layer keeps the previous token's pair with chance `stay`, else draws a new one; 8 sequences."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, L, K), np.int16)
    for t in range(n):
        for layer in range(L):
            ids[t, layer] = ids[t - 1, layer] if t and rng.random() < stay else rng.choice(E, K, replace=False)
    return Trace(fingerprint="f", arch="llama", n_layer=L, n_expert=E, n_expert_used=K,
                 moe_layers=np.arange(L, dtype=np.int32), expert_ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
                 is_prompt=np.zeros(n, bool), sequence=(np.arange(n) * 8 // n).astype(np.int32),
                 position=np.arange(n, dtype=np.int32), token=np.full(n, -1, np.int32))


def planner_visits(trace: Trace, train: Trace) -> np.ndarray:
    """(N-1, L, E) the next-visit prediction for token t+1 that the planner, fitted on `train`, makes online."""
    cache = CacheConfig(1, L * E)  # every expert fits: only the predictions matter here
    planner = Planner(CostModel(100 * MB, 100 * MB, 10 * MB, 1000 * MB, 0), PlannerSettings(fitted_visits=True))
    seen = []
    step = planner.step

    def record(layer, needed, weights, state, fresh):
        out = step(layer, needed, weights, state, fresh)
        if layer == L - 1:
            seen.append(planner.recent.copy())
        return out

    planner.step = record
    replay(planner, trace, train, planner.cost, cache, np.full(L * E, MB, np.int64))
    return np.stack(seen[:-1])


def test_next_visit_learns_sticky_routing():
    train, test = sticky(800, 0), sticky(400, 1)
    prior = FrequencyPrior.fit(train)
    model = NextVisit.fit(train, prior, TokenReuse.fit(train, prior))
    assert model.weights[1] > 0.5  # "this token chose it" carries most of the next token's choice
    pred = planner_visits(test, train)
    truth = chosen(test)[1:]
    assert recall_at(pred, truth, K) > 0.8 > recall_at(np.broadcast_to(prior.prob, truth.shape), truth, K) + 0.4


def test_planner_with_fitted_visits_beats_frequency_only_visits_on_sticky_routing():
    train, test = sticky(600, 2, stay=0.7), sticky(300, 3, stay=0.7)
    cost = CostModel(100 * MB, 90 * MB, 10 * MB, 1000 * MB, 0)
    cache, eb = CacheConfig(1, 8), np.full(L * E, MB, np.int64)
    fitted = replay(Planner(cost, PlannerSettings(fitted_visits=True)), test, train, cost, cache, eb)
    frequency = PlannerSettings(online_weight=1.0, recency_weight=0.0)  # hand-set weights that ignore stickiness
    assert fitted.hit_rate > replay(Planner(cost, frequency), test, train, cost, cache, eb).hit_rate + 0.1


def test_upcoming_uses_discount_later_tokens_within_a_sequence():
    trace = sticky(8, 4)  # 8 tokens, one per sequence: nothing follows any token
    use = chosen(trace)
    np.testing.assert_array_equal(upcoming(trace, use, 4.0), use)
    one = replace(trace, sequence=np.zeros(8, np.int32))  # the same tokens as one sequence
    got = upcoming(one, use, 2.0)  # weights 1, 1/2, 1/4, ... normalised by those present
    np.testing.assert_allclose(got[-2], (use[-2] + 0.5 * use[-1]) / 1.5)
    np.testing.assert_allclose(got[0], np.tensordot(0.5 ** np.arange(8), use, 1) / (2 - 0.5 ** 7), rtol=1e-6)
    np.testing.assert_array_equal(upcoming(one, use, 1.0), use)  # horizon 1: the token's own uses alone
