"""route() is a pure function: each gating mode against a hand computation."""

from __future__ import annotations

import numpy as np

from moe_tier.config import Gating
from moe_tier.moe import route

LOGITS = np.array([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 0.2, 4.0]], dtype=np.float32)


def softmax(x):
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def test_softmax_top_k_renormalised():
    r = route(LOGITS, 2, Gating.SOFTMAX, weights_norm=True)
    assert r.ids.tolist() == [[1, 2], [3, 0]]
    np.testing.assert_allclose(r.weights[0], softmax(np.array([3.0, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_without_renormalisation_keeps_full_softmax_mass():
    r = route(LOGITS, 2, Gating.SOFTMAX, weights_norm=False)
    np.testing.assert_allclose(r.weights[0], softmax(LOGITS[0])[[1, 2]], rtol=1e-6)


def test_sigmoid_selection_bias_changes_choice_not_weight():
    bias = np.array([0.0, 0.0, 0.0, 10.0], dtype=np.float32)
    r = route(LOGITS, 2, Gating.SIGMOID, weights_norm=False, weights_scale=2.5, selection_bias=bias)
    assert r.ids[0].tolist() == [3, 1]  # the bias picks expert 3 ...
    sig = 1 / (1 + np.exp(-LOGITS[0]))
    np.testing.assert_allclose(r.weights[0], 2.5 * sig[[3, 1]], rtol=1e-6)  # ... but weights are unbiased


def test_softmax_weight_is_softmax_over_the_chosen_logits():
    r = route(LOGITS, 2, Gating.SOFTMAX_WEIGHT, weights_norm=False)
    np.testing.assert_allclose(r.weights[1], softmax(np.array([4.0, 0.5])), rtol=1e-6)
