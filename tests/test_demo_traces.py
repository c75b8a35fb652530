"""The demo model's recorded routing (tests/fixtures/demo-traces, made by tools/demo_traces.py) is real:
it belongs to data/demo-moe.gguf, is far from uniform, differs by domain, and a frequency prior fitted on
one half of a domain predicts the other half better than chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_tier.reader import open_model
from router_predict import stats, trace

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("python", "english", "german", "french", "rst")


@pytest.fixture(scope="module")
def traces():
    return {d: trace.load(ROOT / "tests" / "fixtures" / "demo-traces" / f"{d}.npz") for d in DOMAINS}


def shares(t) -> np.ndarray:
    c = stats.counts(t).astype(float)
    return c / c.sum(axis=1, keepdims=True)  # (L, E): share of the layer's selections


def test_traces_belong_to_the_demo_model(traces):
    fingerprint = open_model(ROOT / "data" / "demo-moe.gguf").fingerprint
    for t in traces.values():
        trace.check_model(t, fingerprint, "data/demo-moe.gguf")
        assert t.n_tokens > 1000 and t.is_prompt.any() and (~t.is_prompt).any()


def test_routing_is_not_uniform(traces):
    for t in traces.values():
        s = shares(t)
        uniform = 1 / t.n_expert
        assert (s.max(axis=1) > 1.25 * uniform).all()  # every layer has a favourite
        assert s.max() > 2.5 * uniform


def test_domains_route_differently(traces):
    s = {d: shares(t) for d, t in traces.items()}
    tv = lambda a, b: 0.5 * np.abs(s[a] - s[b]).sum(axis=1).mean()  # noqa: E731
    assert tv("python", "english") > 0.2 and tv("english", "german") > 0.2


def test_frequency_prior_beats_chance_held_out(traces):
    for t in traces.values():
        first = t.sequence < np.median(t.sequence)
        fit = np.zeros((t.n_moe_layers, t.n_expert))
        for layer in range(t.n_moe_layers):
            np.add.at(fit[layer], t.expert_ids[first, layer].reshape(-1), 1)
        guess = np.argsort(-fit, axis=1)[:, : t.n_expert_used]  # (L, K) the prior's top-k
        test = t.expert_ids[~first]  # (N, L, K)
        hits = (test[..., :, None] == guess[None, :, None, :]).any(-1).mean()
        assert hits > 1.2 * t.n_expert_used / t.n_expert  # recall@k well above uniform
