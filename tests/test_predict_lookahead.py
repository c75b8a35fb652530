"""Gate lookahead, plain and fitted, on hidden states built so that the residual stream drifts linearly."""

from __future__ import annotations

import numpy as np

from router_predict.lookahead import FittedLookahead, gate_lookahead
from router_predict.predictors import recall_at

T, H, E, K = 1200, 48, 8, 2


def drifting(seed: int, drift: float):
    """Layer l's states, layer l+d's router input (a fixed linear map of them plus noise) and its router."""
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((E, H))
    mix = np.eye(H) + drift * rng.standard_normal((H, H)) / np.sqrt(H)
    now = rng.standard_normal((T, H))
    later = now @ mix + 0.1 * rng.standard_normal((T, H))
    groups = np.arange(T) // 100  # twelve "sequences"
    return router, now, later, groups


def truth_of(router, later) -> np.ndarray:
    t = np.zeros((len(later), E))
    np.put_along_axis(t, np.argsort(-(later @ router.T), -1)[:, :K], 1, -1)
    return t


def test_fitted_lookahead_learns_the_drift_that_the_plain_router_misses():
    router, now, later, groups = drifting(0, drift=1.0)
    fit = groups < 6  # fit on half the sequences, score on the other half
    model = FittedLookahead.fit(router, now[fit], later[fit], groups[fit], K)
    truth = truth_of(router, later[~fit])
    plain = recall_at(gate_lookahead(router, now[~fit]), truth, K)
    fitted = recall_at(model.probs(now[~fit]), truth, K)
    assert np.isfinite(model.ridge)  # a correction was chosen
    assert fitted > plain + 0.2 and fitted > 0.85
    assert model.weight.shape == (E, H) and model.bias.shape == (E,)  # the size of one router
    np.testing.assert_allclose(model.probs(now[:5]).sum(-1), 1.0, rtol=1e-5)


def test_without_drift_the_fit_stays_close_to_the_plain_router():
    router, now, later, groups = drifting(1, drift=0.0)
    fit = groups < 6
    model = FittedLookahead.fit(router, now[fit], later[fit], groups[fit], K)
    truth = truth_of(router, later[~fit])
    plain = recall_at(gate_lookahead(router, now[~fit]), truth, K)
    assert recall_at(model.probs(now[~fit]), truth, K) > plain - 0.02


def test_one_sequence_means_no_cross_validation_and_the_plain_router():
    router, now, later, _ = drifting(2, drift=1.0)
    model = FittedLookahead.fit(router, now[:200], later[:200], np.zeros(200), K)
    assert model.ridge == np.inf
    np.testing.assert_allclose(model.probs(now[:10]), gate_lookahead(router, now[:10]), rtol=1e-4, atol=1e-6)
