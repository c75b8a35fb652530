"""Trace format, JSONL import, stats and predictors on hand-built routing with known properties."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from moe_tier.errors import MoeTierError
from router_predict import trace as tr
from router_predict.jsonl import read_jsonl
from router_predict.lookahead import gate_lookahead
from router_predict.predictors import Combined, CrossLayer, FrequencyPrior, TokenReuse, chosen, evaluate, recall_at
from router_predict.recorder import TraceRecorder
from router_predict.stats import layer_stats


def make_trace(ids: np.ndarray, sequence=None, fingerprint="f00d", n_expert=8, is_prompt=None) -> tr.Trace:
    """ids (N, L, K) -> a trace with equal gate weights."""
    n, L, K = ids.shape
    return tr.Trace(fingerprint=fingerprint, arch="llama", n_layer=L, n_expert=n_expert, n_expert_used=K,
                    moe_layers=np.arange(L, dtype=np.int32), expert_ids=ids.astype(np.int16),
                    weights=np.full(ids.shape, 1.0 / K, np.float32),
                    is_prompt=np.zeros(n, bool) if is_prompt is None else is_prompt,
                    sequence=np.zeros(n, np.int32) if sequence is None else np.asarray(sequence, np.int32),
                    position=np.arange(n, dtype=np.int32), token=np.arange(n, dtype=np.int32))


def structured(n: int, L: int = 6, E: int = 8, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """Token t picks a random first expert a; layer l then picks (a + l) % E and (a + 3 l + 1) % E."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, E, n)
    ids = np.stack([np.stack([(a + l) % E, (a + 3 * l + 1) % E], -1) for l in range(L)], 1)
    flip = rng.random(ids.shape[:2]) < noise
    ids[flip, 0] = rng.integers(0, E, flip.sum())
    ids[..., 1] = np.where(ids[..., 1] == ids[..., 0], (ids[..., 1] + 1) % E, ids[..., 1])
    return ids


def test_save_load_round_trip(tmp_path):
    t = make_trace(structured(20), is_prompt=np.arange(20) < 5)
    tr.save(t, tmp_path / "t.npz")
    u = tr.load(tmp_path / "t.npz")
    for name in tr.ARRAYS:
        np.testing.assert_array_equal(getattr(u, name), getattr(t, name))
    assert (u.fingerprint, u.arch, u.n_expert, u.n_expert_used) == ("f00d", "llama", 8, 2)


def test_merge_renumbers_sequences_and_refuses_other_models(tmp_path):
    a, b = make_trace(structured(5), sequence=[3] * 5), make_trace(structured(4), sequence=[0, 0, 1, 1])
    m = tr.merge([a, b])
    assert m.n_tokens == 9 and m.sequence.tolist() == [0] * 5 + [1, 1, 2, 2]
    with pytest.raises(MoeTierError, match="fingerprint"):
        tr.merge([a, make_trace(structured(3), fingerprint="beef")])


@pytest.mark.parametrize("bad", ["truncated", "garbage", "version"])
def test_bad_trace_files_are_one_line_errors(tmp_path, capsys, bad):
    path = tmp_path / "t.npz"
    tr.save(make_trace(structured(30)), path)
    data = path.read_bytes()
    if bad == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif bad == "garbage":
        path.write_bytes(b"not a trace at all")
    else:
        with np.load(path) as z:
            arrays = dict(z)
        meta = json.loads(str(arrays["meta"]))
        meta["version"] = 99
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(MoeTierError):
        tr.load(path)
    assert main(["trace", "stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_validate_rejects_inconsistent_arrays():
    ids = structured(4)
    with pytest.raises(MoeTierError, match="expert ids outside"):
        make_trace(ids, n_expert=4)
    with pytest.raises(MoeTierError, match="sequence"):
        make_trace(ids, sequence=[0, 0])


def test_jsonl_import_drops_incomplete_tokens(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [{"problem_id": p, "token_idx": t, "layer": l, "experts": [l, (t + 1) % 8], "gating_probs": [0.7, 0.3]}
            for p in (0, 1) for t in range(3) for l in range(4) if not (p == 1 and t == 2 and l == 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    t, dropped = read_jsonl(path, n_expert=8, fingerprint="x", arch="llama")
    assert dropped == 1 and t.n_tokens == 5 and t.sequence.tolist() == [0, 0, 0, 1, 1]
    assert t.expert_ids[4, 2].tolist() == [2, 2] and np.allclose(t.weights[0, 0], [0.7, 0.3])


def test_stats_of_known_routing():
    ids = np.zeros((10, 3, 2), int)
    ids[..., 1] = 1  # every token: experts 0 and 1 at every layer
    s = layer_stats(make_trace(ids))
    np.testing.assert_allclose(s.entropy_bits, 1.0)
    np.testing.assert_allclose(s.reuse_distance, 1.0)
    np.testing.assert_allclose(s.reuse_next, 1.0)
    np.testing.assert_allclose(s.cooccurrence[0, 0, :2], 0.5)
    alternating = np.stack([np.stack([np.arange(10) % 2 * 2, np.arange(10) % 2 * 2 + 1], -1)] * 2, 1)
    s = layer_stats(make_trace(alternating))  # {0,1}, {2,3}, {0,1}, ...
    np.testing.assert_allclose(s.reuse_distance, 2.0)
    np.testing.assert_allclose(s.reuse_next, 0.0)


def test_predictors_learn_structure_and_score_held_out():
    train, test = make_trace(structured(400, seed=1)), make_trace(structured(200, seed=2))
    model = Combined.fit(train)
    rows = {(r["predictor"], r["distance"]): r for r in evaluate(model, test)}
    for d in range(1, 5):  # layer l fixes the token's a, so every later layer is determined
        assert rows["cross-layer", d]["recall@k"] > 0.99
        assert rows["combined", d]["recall@k"] > 0.99
    assert rows["frequency prior", 1]["recall@k"] < 0.5  # routing is uniform overall
    assert rows["token reuse", 1]["recall@k"] < 0.5  # tokens are independent


def test_token_reuse_predicts_sticky_routing():
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.random(300) < 0.1) % 8  # the first expert changes every ~10 tokens
    ids = np.stack([np.stack([a, (a + 4) % 8], -1)] * 3, 1)
    prior = FrequencyPrior.fit(make_trace(ids[:200]))
    reuse = TokenReuse.fit(make_trace(ids[:200]), prior)
    test = make_trace(ids[200:])
    assert recall_at(reuse.predict_all(test, 1)[1:], chosen(test)[1:], 2) > 0.85
    assert recall_at(CrossLayer.fit(make_trace(ids[:200]), prior).predict_all(test, 1)[:, 1:],
                     chosen(test)[:, 1:], 2) > 0.99  # layer l+1 repeats layer l


def test_gate_lookahead_recall_follows_residual_drift():
    """Hidden states that drift little over d layers let layer l+d's router pick its experts early."""
    rng = np.random.default_rng(0)
    T, H, E, K = 512, 64, 16, 2
    router = rng.standard_normal((E, H)).astype(np.float32)
    h_now = rng.standard_normal((T, H)).astype(np.float32)

    def recall(drift):
        h_later = h_now + drift * rng.standard_normal((T, H)).astype(np.float32)
        truth = np.zeros((T, E))
        np.put_along_axis(truth, np.argsort(-(h_later @ router.T), -1)[:, :K], 1, -1)
        return recall_at(gate_lookahead(router, h_now), truth, K)

    assert recall(0.1) > 0.85
    assert recall(3.0) < recall(0.3) < recall(0.1)
    np.testing.assert_allclose(gate_lookahead(router, h_now).sum(-1), 1.0, rtol=1e-5)


def test_recorder_splits_forward_passes_and_marks_prompt():
    rec = TraceRecorder(fingerprint="f", arch="llama", n_layer=3, n_expert=4, n_expert_used=1, moe_layers=[1, 2],
                        engine="test")
    rec.begin_sequence([5, 6, 7])
    rec.record(1, np.array([[0], [1], [2]]), np.ones((3, 1)))
    rec.record(2, np.array([[3], [2], [1]]), np.ones((3, 1)))
    rec.generated(9)
    rec.record(1, np.array([[3]]), np.ones((1, 1)))
    rec.record(2, np.array([[0]]), np.ones((1, 1)))
    rec.generated(10)
    t = rec.trace()
    assert t.expert_ids[:, :, 0].tolist() == [[0, 3], [1, 2], [2, 1], [3, 0]]
    assert t.is_prompt.tolist() == [True, True, True, False]
    assert t.token.tolist() == [5, 6, 7, 9] and t.position.tolist() == [0, 1, 2, 3]
    assert t.moe_layers.tolist() == [1, 2]
    rec.begin_sequence([1])
    rec.record(1, np.array([[0]]), np.ones((1, 1)))
    with pytest.raises(RuntimeError, match="layers \\[2\\]"):
        rec.record(1, np.array([[0]]), np.ones((1, 1)))


def test_import_and_predict_commands(tmp_path, capsys):
    jsonl = tmp_path / "r.jsonl"
    ids = structured(120, L=4, seed=3)
    seq = np.arange(120) // 40
    jsonl.write_text("\n".join(json.dumps({"problem_id": int(seq[t]), "token_idx": t, "layer": l,
                                           "experts": ids[t, l].tolist(), "gating_probs": [0.6, 0.4]})
                               for t in range(120) for l in range(4)))
    out = tmp_path / "t.npz"
    assert main(["trace", "import", str(jsonl), "--out", str(out), "--n-expert", "8", "--fingerprint", "ab"]) == 0
    t = tr.load(out)
    assert t.n_tokens == 120 and len(t.sequences()) == 3 and t.fingerprint == "ab"
    capsys.readouterr()
    assert main(["trace", "predict", str(out), "--json"]) == 0  # fit on sequences 0-1, score on 2
    rows = json.loads(capsys.readouterr().out)
    cross = [r for r in rows if r["predictor"] == "cross-layer"]
    assert len(cross) == 3 and all(r["recall@k"] > 0.9 for r in cross)  # 4 layers: 3 distances to score
    assert main(["trace", "import", str(jsonl), "--out", str(out)]) == 2  # neither --model nor --n-expert
