"""`moe-tier profile`: both engines record the same routing; the trace commands refuse bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from moe_tier.machine import probe
from moe_tier.plan import Budget, plan_tiers
from moe_tier.reader import open_model
from router_predict import trace as tr

pytest.importorskip("llama_cpp")

PROMPTS = ["Once upon a time there was a fox", "def main(): return 42", "Der schnelle braune Fuchs springt"]
N_NEW = 8


def profile(model, tmp_path, engine):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / f"{engine}.npz"
    assert main(["profile", str(model), "--prompts", str(prompts), "--out", str(out), "-n", str(N_NEW),
                 "--engine", engine]) == 0
    return tr.load(out)


def agreement(a: tr.Trace, b: tr.Trace) -> tuple[float, float]:
    """Share of (token, layer) with the same expert set, and the largest weight gap where they agree."""
    same = (np.sort(a.expert_ids, -1) == np.sort(b.expert_ids, -1)).all(-1)
    order_a, order_b = np.argsort(a.expert_ids, -1), np.argsort(b.expert_ids, -1)
    wa = np.take_along_axis(a.weights, order_a, -1)[same]
    wb = np.take_along_axis(b.weights, order_b, -1)[same]
    return float(same.mean()), float(np.abs(wa - wb).max())


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("qwen3moe", "F32"), ("olmoe", "F32"),
                                        ("qwen2moe", "F32"), ("llama", "Q4_K")])
def test_engines_record_the_same_routing(synth_model, tmp_path, arch, qtype):
    model = synth_model(arch, qtype=qtype)
    ours, theirs = profile(model, tmp_path, "moe-tier"), profile(model, tmp_path, "llama.cpp")
    assert ours.fingerprint == theirs.fingerprint and ours.engine == "moe-tier" and theirs.engine == "llama.cpp"
    assert ours.n_tokens == theirs.n_tokens
    np.testing.assert_array_equal(ours.is_prompt, theirs.is_prompt)
    np.testing.assert_array_equal(ours.sequence, theirs.sequence)
    np.testing.assert_array_equal(ours.position, theirs.position)
    assert (~ours.is_prompt).sum() == len(PROMPTS) * (N_NEW - 1)  # the last new token is never fed back
    prompt = ours.is_prompt
    np.testing.assert_array_equal(ours.token[prompt], theirs.token[prompt])
    same, weight_gap = agreement(ours, theirs)
    # llama.cpp rounds activations to 8 bits before quantized dot products, which can flip a near-tied expert
    assert same >= (1.0 if qtype == "F32" else 0.95)
    assert weight_gap < (1e-3 if qtype == "F32" else 2e-2)


def test_merged_traces_and_stats_command(synth_model, tmp_path, capsys):
    model = synth_model("qwen3moe")
    a = profile(model, tmp_path, "llama.cpp")
    merged = tmp_path / "merged.npz"
    assert main(["trace", "merge", str(merged), str(tmp_path / "llama.cpp.npz"), str(tmp_path / "llama.cpp.npz")]) == 0
    m = tr.load(merged)
    assert m.n_tokens == 2 * a.n_tokens and len(m.sequences()) == 2 * len(PROMPTS)
    assert main(["trace", "stats", str(merged), "--json"]) == 0
    assert '"entropy_bits"' in capsys.readouterr().out


def replay_args(trace, model, slots=3):
    """A VRAM budget that leaves `slots` expert slots after the GPU's fixed part."""
    desc = open_model(model)
    plan = plan_tiers(desc, probe(), Budget(vram_bytes=(2**30,)))
    vram = plan.gpus[0].fixed_bytes + slots * plan.gpus[0].slot_bytes
    return ["replay", str(trace), "--model", str(model), "--vram", str(vram), "--h2d", "51GiB",
            "--cpu-read", "55GiB", "--disk", "1.6GB", "--gpu-read", "2TB"]


def test_replay_command_and_its_bad_input(synth_model, tmp_path, capsys):
    model, other = synth_model("llama"), synth_model("qwen3moe")
    profile(model, tmp_path, "llama.cpp")
    trace = tmp_path / "llama.cpp.npz"
    assert main(replay_args(trace, model) + ["--json"]) == 0
    results = {r["policy"].split(" (")[0]: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == {"LRU", "LFU", "LFRU", "static pinning", "planner", "Belady MIN", "Belady"}
    assert all(r["hit_rate"] <= results["Belady"]["hit_rate"] for name, r in results.items()
               if name != "planner")
    assert results["static pinning"]["h2d_bytes_per_token"] == 0 and results["LRU"]["cpu_share"] == 0
    assert main(replay_args(trace, model)) == 0
    assert "planner" in capsys.readouterr().out
    assert main(replay_args(trace, model) + ["--objective", "speed"]) == 0  # the planner tuned for tokens/s
    out = capsys.readouterr().out
    assert "planner" in out and "tuned for speed" in out
    assert main(replay_args(trace, other)) == 2  # another model's trace
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recorded on model" in err
    trace.write_bytes(trace.read_bytes()[:-100])  # truncated
    assert main(replay_args(trace, model)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err


def test_profile_bad_input(synth_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["profile", str(synth_model("llama")), "--prompts", str(empty), "--out", str(tmp_path / "t.npz")]) == 2
    assert "no prompts" in capsys.readouterr().err
