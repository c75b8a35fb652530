"""route() is a pure function: each gating mode against a hand computation. moe_ffn: one token alone (the decode
path) gives the bits it gets in a batch."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q, quants

from moe_tier.config import Gating
from moe_tier.moe import ExpertWeights, Routing, moe_ffn, route
from moe_tier.tensors import QTensor

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


class RandomExperts:
    """E experts of D=64 -> F=96 -> D in Q8_0, built in memory."""

    def __init__(self, n_expert: int, seed: int):
        rng = np.random.default_rng(seed)

        def matrix(name, n_rows, n_cols):
            data = quants.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), Q.Q8_0)
            return QTensor.over(name, data.reshape(-1), Q.Q8_0, (n_cols, n_rows))

        self.experts = [ExpertWeights(matrix("gate", 96, 64), matrix("up", 96, 64), matrix("down", 64, 96))
                        for _ in range(n_expert)]

    def expert(self, eid):
        return self.experts[eid.expert]


def test_moe_ffn_of_one_token_is_its_row_of_the_batch():
    experts = RandomExperts(4, seed=0)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ids = np.array([[2, 0], [0, 1], [2, 3]], dtype=np.int32)
    weights = np.array([[0.7, 0.3], [0.55, 0.45], [0.9, 0.1]], dtype=np.float32)
    batch = moe_ffn(x, Routing(ids, weights), 0, experts)
    for t in range(3):
        alone = moe_ffn(x[t:t + 1], Routing(ids[t:t + 1], weights[t:t + 1]), 0, experts)
        np.testing.assert_array_equal(alone[0], batch[t])
