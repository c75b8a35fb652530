"""The decoder on the GPU backend (torch + Triton) computes what the CPU backend computes.

Without CUDA the GPU backend runs on CPU tensors under Triton's interpreter, with the experts computed by the
host tiers, so the backend's dense path is checked everywhere; with CUDA the whole engine runs on the GPU
(slot pool, pinned warm tier, cold reads) with all experts hot, half hot and all cold.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from moe_tier.engine import Engine  # noqa: E402
from moe_tier.gpu_ops import GpuOps  # noqa: E402
from moe_tier.host_ops import HostOps  # noqa: E402
from moe_tier.host_tiers import HostExperts  # noqa: E402
from moe_tier.models import family  # noqa: E402
from moe_tier.moe import moe_ffn  # noqa: E402
from moe_tier.plan import Budget, plan_tiers  # noqa: E402
from moe_tier.machine import probe  # noqa: E402
from moe_tier.reader import open_model  # noqa: E402
from moe_tier.stats import EngineStats  # noqa: E402
from moe_tier.tensors import Weights  # noqa: E402

CUDA = torch.cuda.is_available()
# Relative to the spread of the logits: the CPU backend quantizes activations to 8 bits as llama.cpp does, the
# Triton kernels multiply float (tf32 on the GPU) by the dequantized blocks.
TOL = {"F32": 2e-3 if not CUDA else 2e-2, "Q8_0": 0.1, "Q4_0": 0.1, "Q4_K": 0.1}
PROMPT = "The quick brown fox jumps over the lazy dog. def main(): return 42"


def on_first_gpu(vram: int) -> tuple[int, ...]:
    """A budget for GPU 0 alone (0 leaves a GPU out): these tests mean one GPU on a machine with several."""
    return (vram,) + (0,) * (torch.cuda.device_count() - 1)


def first_gpu_plan(desc, ctx: int):
    """GPU 0's plan when it holds every layer (its fixed part and slot size)."""
    machine = probe()
    return plan_tiers(desc, machine, Budget(vram_bytes=on_first_gpu(machine.gpus[0].total_bytes), ctx=ctx)).gpus[0]


def decode_eager_and_graphed(eng: Engine, tokens: np.ndarray, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of `tokens` fed one at a time, as generation runs: eager forward steps, then CUDA graph steps."""
    from moe_tier.models import Segment

    cache = eng.model.new_cache(ctx)
    eager = np.concatenate([eng.model.ops.to_host(eng.model.forward(tokens[i : i + 1], [Segment(cache, 0, 1)]))
                            for i in range(len(tokens))])
    cache = eng.model.new_cache(ctx)
    graphed = np.concatenate([eng.step(cache, tokens[i : i + 1]) for i in range(len(tokens))])
    return eager, graphed


def assert_close(ours: np.ndarray, ref: np.ndarray, tol_rel: float) -> None:
    """Most positions within the tolerance; a few may differ more where a near-tied expert choice flips under the
    two backends' different activation rounding (llama.cpp's CPU and CUDA backends part the same way)."""
    noise = np.abs(ours - ref).max(axis=1)
    assert np.mean(noise < tol_rel * ref.std()) >= 0.9 and noise.max() < 0.5 * ref.std()
    top2 = np.sort(ref, axis=1)[:, -2:]
    differ = ours.argmax(1) != ref.argmax(1)
    assert not (differ & (top2[:, 1] - top2[:, 0] > 2 * noise)).any()


@pytest.mark.skipif(CUDA, reason="the CUDA run covers the whole engine")
@pytest.mark.parametrize("arch,qtype", [("qwen3moe", "F32"), ("qwen2moe", "Q8_0"), ("llama", "Q4_K")])
def test_gpu_backend_dense_path_matches_cpu_backend(synth_model, arch, qtype):
    cpu = Engine.open(synth_model(arch, qtype=qtype), ctx=64)
    experts = HostExperts(cpu.desc, [], EngineStats())

    def host_moe(x, routing, layer):
        return torch.from_numpy(moe_ffn(x.numpy(), routing, layer, experts))

    gpu_model = family(cpu.desc.arch, cpu.desc.path)(cpu.desc.config,
                                                     GpuOps(cpu.desc.config, cpu.weights, host_moe, torch.device("cpu")))
    tokens = cpu.tokenize(PROMPT)[:12]
    from moe_tier.models import Segment

    ours = gpu_model.forward(np.array(tokens), [Segment(gpu_model.new_cache(64), 0, len(tokens))]).numpy()
    assert_close(ours, cpu.logits(tokens), TOL[qtype])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hot", ["all", "half", "none"])
@pytest.mark.parametrize("arch,qtype", [("qwen3moe", "Q8_0"), ("llama", "Q4_0"), ("qwen2moe", "F32")])
@pytest.mark.parametrize("policy", ["planner", "lru"])
def test_gpu_engine_matches_cpu_engine(synth_model, arch, qtype, hot, policy):
    path = synth_model(arch, qtype=qtype)
    desc = open_model(path)
    host = HostOps(desc.config, Weights(desc), HostExperts(desc, [], EngineStats()))
    cpu_model = family(desc.arch, desc.path)(desc.config, host)
    g = first_gpu_plan(desc, ctx=128)
    n_hot = {"all": len(desc.experts), "half": len(desc.experts) // 2, "none": 0}[hot]
    vram = g.fixed_bytes + n_hot * g.slot_bytes + g.slot_bytes // 2
    eng = Engine.open(path, ctx=128, vram=on_first_gpu(vram), ram=0 if hot == "none" else None, policy=policy)
    assert type(eng.model.ops).__name__ == "GpuOps" and (eng.tiers.planner is not None) == (policy == "planner")
    assert len(eng.plan.hot) == n_hot
    if hot == "none":  # no RAM for a warm tier: the summary says why decode reads routing back
        assert eng.decode_mode.startswith("routing read back every layer: some experts are cold")
    tokens = list(np.random.default_rng(0).integers(3, eng.n_vocab, 32))  # no tokenizer needed on the GPU machine
    from moe_tier.models import Segment

    ref = cpu_model.forward(np.array(tokens), [Segment(cpu_model.new_cache(128), 0, len(tokens))])
    assert_close(eng.logits(tokens), ref, TOL[qtype])
    eng.tiers.check()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hot", ["all", "half", "none"])
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_K"), ("qwen3moe", "Q8_0")])
@pytest.mark.parametrize("lookahead", [0, 1], ids=["", "lookahead"])
@pytest.mark.parametrize("policy", ["planner", "lfu"])
def test_gpu_decode_with_routing_on_the_device_matches_cpu_engine(tmp_path, monkeypatch, arch, qtype, hot, lookahead,
                                                                  policy):
    """Token by token, as generation runs: every expert pinned, so the router's choice never leaves the GPU;
    eagerly and as CUDA graphs (a small bucket, so the step crosses several captured lengths); with the gate
    lookahead staging predicted warm experts a layer early; slots promoted and prefetched by the live planner or
    promoted by LFU: the same logits."""
    from moe_tier import gpu_graph
    from moe_tier.models import Segment
    from moe_tier.moe_decode import DeviceMoE
    from moe_tier.synth import tiny, write_fast

    monkeypatch.setattr(gpu_graph, "BUCKET_KEYS", 8)
    path = write_fast(tmp_path / f"{arch}-{qtype}.gguf", tiny(arch, qtype=qtype))
    desc = open_model(path)
    cpu_model = family(desc.arch, desc.path)(desc.config, HostOps(desc.config, Weights(desc), HostExperts(desc, [], EngineStats())))
    g = first_gpu_plan(desc, ctx=64)
    n_hot = {"all": len(desc.experts), "half": len(desc.experts) // 2, "none": 0}[hot]
    eng = Engine.open(path, ctx=64, vram=on_first_gpu(g.fixed_bytes + n_hot * g.slot_bytes + g.slot_bytes // 2),
                      lookahead=lookahead, policy=policy)
    assert isinstance(eng.model.ops.moe, DeviceMoE) and len(eng.plan.hot) == n_hot
    assert eng.decode_mode == "routing stays on the GPU, one CUDA graph a step"
    tokens = np.random.default_rng(1).integers(3, eng.n_vocab, 24)
    ref = cpu_model.forward(tokens, [Segment(cpu_model.new_cache(64), 0, len(tokens))])
    eager, graphed = decode_eager_and_graphed(eng, tokens, ctx=64)
    assert_close(eager, ref, TOL[qtype])
    assert len(eng._graphs.graphs) == 3  # 24 positions in buckets of 8
    assert_close(graphed, ref, TOL[qtype])
    np.testing.assert_allclose(graphed, eager, atol=1e-3 * ref.std())  # the same kernels, captured or not
    eng.model.ops.moe.account()
    assert sum(c.hits for c in eng.stats.tiers.values()) >= 2 * len(tokens) * len(desc.moe_layers)
    if lookahead and eng.tiers.stage_slots[0] >= (lookahead + 2) * desc.config.n_expert_used:  # qwen3moe, half
        assert eng.model.ops.moe.lookahead and eng.stats.tiers["ahead"].hits > 0  # it ran, its guesses got used
    eng.tiers.check()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("hot", ["half", "none"])
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_K"), ("qwen3moe", "Q8_0")])
def test_gpu_decode_with_a_cpu_share_matches_cpu_engine(tmp_path, monkeypatch, arch, qtype, hot):
    """Each staged expert split: the CPU computes the first rows of gate and up from the pinned blob while the copy
    engine stages the rest for the GPU, handing ids and rows over through pinned memory and flags inside the step's
    CUDA graph. Eager and graphed steps give the CPU engine's logits, and each warm use is counted on both sides."""
    from moe_tier import gpu_graph, kernels
    from moe_tier.cpu_share import side_by_side
    from moe_tier.tiers.links import balanced_share
    from moe_tier.models import Segment
    from moe_tier.synth import tiny, write_fast

    monkeypatch.setattr(gpu_graph, "BUCKET_KEYS", 8)
    path = write_fast(tmp_path / f"{arch}-{qtype}.gguf", tiny(arch, qtype=qtype, n_ff_exp=1024))
    desc = open_model(path)
    cpu_model = family(desc.arch, desc.path)(desc.config, HostOps(desc.config, Weights(desc), HostExperts(desc, [], EngineStats())))
    g = first_gpu_plan(desc, ctx=64)
    n_hot = {"half": len(desc.experts) // 2, "none": 0}[hot]
    eng = Engine.open(path, ctx=64, vram=on_first_gpu(g.fixed_bytes + n_hot * g.slot_bytes + g.slot_bytes // 2),
                      cpu_share=0.5)
    cut, ref = next(iter(eng.model.ops.moe.cpu.cuts.values())), next(iter(desc.experts.values()))
    assert cut.rows == 512 and cut.cpu_bytes == 512 * 2 * kernels.row_bytes(ref.part("gate").qtype, desc.config.n_embd)
    assert eng.decode_mode.endswith(f"one CUDA graph a step; the CPU computes {cut.cpu_bytes / ref.n_bytes:.0%} of "
                                    "each staged expert")
    tokens = np.random.default_rng(2).integers(3, eng.n_vocab, 20)
    ref = cpu_model.forward(tokens, [Segment(cpu_model.new_cache(64), 0, len(tokens))])
    eager, graphed = decode_eager_and_graphed(eng, tokens, ctx=64)
    assert_close(eager, ref, TOL[qtype])
    assert_close(graphed, ref, TOL[qtype])
    np.testing.assert_allclose(graphed, eager, atol=5e-2 * ref.std())
    eng.model.ops.moe.account()
    assert eng.stats.links["warm->cpu share"].hits == eng.stats.tiers["warm"].hits > 0
    rates = side_by_side(eng.tiers, 0.5)  # the CPU timed beside the link's copies
    assert rates is not None and min(rates) > 0 and 0.0 <= balanced_share(*rates) < 1.0
    eng.tiers.check()


def test_attention_with_the_position_on_the_device_equals_the_eager_step(synth_model):
    """A captured decode step attends from a device-side position over a fixed number of cache entries (later
    ones masked); an eager single-token step, from its position uploaded, over exactly the entries so far: the
    same output, position after position (the kernel against the exact math: test_kernels_gpu_decode_ops)."""
    from moe_tier.gpu_ops import StaticStep
    from moe_tier.layers import rope_angles

    desc = open_model(synth_model("qwen3moe"))
    c = desc.config
    device = torch.device("cuda" if CUDA else "cpu")
    ops = GpuOps(c, Weights(desc), None, device)
    eager, static = ops.new_cache(16), ops.new_cache(16)
    gen = torch.Generator().manual_seed(0)
    for pos in range(6):
        q, k, v = (torch.randn((1, n, d), generator=gen).to(device)
                   for n, d in [(c.n_head, c.head_dim_k), (c.n_head_kv, c.head_dim_k), (c.n_head_kv, c.head_dim_v)])
        want = ops.attend(0, eager, q, k, v)
        eager.length += 1
        cos, sin = (torch.from_numpy(a).to(device) for a in rope_angles(pos, 1, c.n_rot, c.rope_freq_base, c.rope_freq_scale))
        ops.static = StaticStep(torch.zeros((1, c.n_embd), device=device), torch.tensor([pos], device=device), cos, sin, 8)
        got = ops.attend(0, static, q, k, v)
        ops.static = None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("hot", ["all", "half", "none"])
def test_two_gpu_pool_matches_cpu_engine(synth_model, hot):
    """The slot pool spans both GPUs (each expert computed on the GPU that holds it, warm ones on their layer's
    home GPU, the CPU computing half of each staged one): prefill and token-by-token decode with routing on the
    device give the CPU engine's logits."""
    from moe_tier.models import Segment

    path = synth_model("qwen3moe", qtype="Q8_0", n_ff_exp=1024)
    desc = open_model(path)
    cpu_model = family(desc.arch, desc.path)(desc.config, HostOps(desc.config, Weights(desc), HostExperts(desc, [], EngineStats())))
    gpus = plan_tiers(desc, probe(), Budget(ctx=128)).gpus[:2]
    per_gpu = {"all": len(desc.experts), "half": len(desc.experts) // 2, "none": 0}[hot] // 2
    eng = Engine.open(path, ctx=128, vram=tuple(g.fixed_bytes + per_gpu * g.slot_bytes + g.slot_bytes // 2 for g in gpus),
                      cpu_share=0.5)
    assert len(eng.tiers.arena) == 2 and len(eng.plan.hot) == 2 * per_gpu
    assert {eng.tiers.table.n_slots[g.index] > 0 for g in gpus} == {per_gpu > 0}
    tokens = np.random.default_rng(0).integers(3, eng.n_vocab, 24)
    ref = cpu_model.forward(tokens, [Segment(cpu_model.new_cache(128), 0, len(tokens))])
    assert_close(eng.logits(tokens), ref, TOL["Q8_0"])
    cache = eng.model.new_cache(128)
    decoded = np.concatenate([eng.step(cache, tokens[i : i + 1], last_only=True) for i in range(len(tokens))])
    assert_close(decoded, ref, TOL["Q8_0"])
    eng.model.ops.moe.account()
    assert ("warm->cpu share" in eng.stats.links) == (hot != "all")
    eng.tiers.check()
