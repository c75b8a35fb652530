"""The public Engine API and its bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_tier import Engine, MoeTierError
from moe_tier.synth import tiny, write_model


def test_public_api(synth_model):
    eng = Engine.open(synth_model("qwen3moe", qtype="Q8_0"), vram=None, ram=None, ctx=64)
    tokens = eng.tokenize("Hello world")
    assert tokens[0] == eng.tokenizer.bos and all(isinstance(t, int) for t in tokens)
    logits = eng.logits(tokens)
    assert logits.shape == (len(tokens), eng.n_vocab) and logits.dtype == np.float32
    text = eng.generate("Hello", max_tokens=8)
    assert isinstance(text, str) and text == eng.generate("Hello", max_tokens=8)  # greedy is deterministic
    a = eng.generate("Hello", max_tokens=8, temperature=1.0, seed=1)
    assert a == eng.generate("Hello", max_tokens=8, temperature=1.0, seed=1)


def test_batch_of_sequences_equals_each_alone(synth_model):
    """The forward pass takes several sequences at once; each gets the logits it gets alone."""
    from moe_tier.models import Segment

    eng = Engine.open(synth_model("llama", qtype="Q8_0"), ctx=64)
    a, b = eng.tokenize("The cat sat on the mat"), eng.tokenize("def main(): return 1")
    caches = [eng.model.new_cache(64), eng.model.new_cache(64)]
    both = eng.model.forward(np.array(a + b), [Segment(caches[0], 0, len(a)), Segment(caches[1], len(a), len(b))])
    np.testing.assert_allclose(both[: len(a)], eng.logits(a), rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[len(a):], eng.logits(b), rtol=0, atol=1e-5)


def test_a_kv_cache_split_by_layer_gives_the_same_logits(synth_model):
    """With layers on several GPUs the cache is one tensor per layer (gpu_ops.new_cache): same logits."""
    from moe_tier.layers import KVCache
    from moe_tier.models import Segment

    eng = Engine.open(synth_model("llama", qtype="Q8_0"), ctx=64)
    tokens = np.array(eng.tokenize("The cat sat on the mat"))
    whole = eng.model.new_cache(64)
    split = KVCache([k.copy() for k in whole.k], [v.copy() for v in whole.v])
    ref = eng.logits(tokens)
    for cache in (whole, split):  # three tokens a step: each step attends over what the previous ones stored
        out = [eng.model.forward(tokens[i : i + 3], [Segment(cache, 0, len(tokens[i : i + 3]))]) for i in range(0, len(tokens), 3)]
        np.testing.assert_array_equal(np.concatenate(out), ref)
    assert split.ctx == 64 and split.length == len(tokens)


def test_warm_tier_gives_the_same_logits(synth_model):
    path = synth_model("llama", qtype="Q8_0")
    cold = Engine.open(path, ram=0, ctx=64)
    warm = Engine.open(path, ctx=64)
    tokens = cold.tokenize("warm and cold")
    np.testing.assert_array_equal(cold.logits(tokens), warm.logits(tokens))
    assert set(cold.stats.hit_rates()) == {"cold"} and set(warm.stats.hit_rates()) == {"warm"}


def test_bad_inputs(synth_model, tmp_path):
    eng = Engine.open(synth_model("llama"), ctx=16)
    with pytest.raises(MoeTierError, match="longer than the context"):
        eng.logits(list(range(1, 40)))
    with pytest.raises(MoeTierError, match="token id 100000 out of range"):
        eng.logits([1, 100000])
    with pytest.raises(MoeTierError, match="exceed the context"):
        eng.generate("Hello", max_tokens=100)


def test_unsupported_architecture_and_quant_type_are_named(synth_model, tmp_path):
    with pytest.raises(MoeTierError, match="'deepseek2' is not supported by the engine yet"):
        Engine.open(synth_model("deepseek2"))
    path = write_model(tmp_path / "iq.gguf", tiny("llama", qtype="IQ4_NL"))
    with pytest.raises(MoeTierError, match=r"tensor \S+: unsupported quant type IQ4_NL"):
        Engine.open(path)


def test_profile_counts_become_each_experts_chance_per_token():
    """The planner policy's prior: k selections per token, so counts / (layer total / k)."""
    from moe_tier.engine import use_per_token
    from moe_tier.reader import ExpertId, open_model

    desc = open_model(Path(__file__).resolve().parent.parent / "data" / "demo-moe.gguf")
    c = desc.config
    counts = np.zeros((c.n_layer, c.n_expert))
    counts[:, 0], counts[:, 1], counts[:, 2] = 10, 6, 4  # 10 tokens, top-2: expert 0 every time
    chance = use_per_token(desc, counts)
    assert chance[ExpertId(0, 0)] == 1.0 and chance[ExpertId(3, 1)] == 0.6 and chance[ExpertId(5, 2)] == 0.4
    assert chance[ExpertId(1, 7)] == 0.0 and use_per_token(desc, None) is None
