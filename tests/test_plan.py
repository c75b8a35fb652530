"""The tier planner: fixed part first, every expert in exactly one tier, profile ranking, remembered fits."""

from __future__ import annotations

import numpy as np
import pytest

from moe_tier.errors import MoeTierError
from moe_tier.fits import FitStore
from moe_tier.machine import GpuInfo, Machine
from moe_tier.plan import Budget, plan_tiers
from moe_tier.reader import open_model

MiB = 1024**2
NO_GPU = Machine(gpus=(), ram_available_bytes=64 * 1024**3, runtime="cpu")


def check_partition(desc, plan):
    """Every routed expert is in exactly one tier; slot counts are respected per GPU."""
    hot, warm, cold = set(plan.hot), set(plan.warm), set(plan.cold)
    assert not (hot & warm) and not (hot & cold) and not (warm & cold)
    assert hot | warm | cold == set(desc.experts)
    for g in plan.gpus:
        assert sum(1 for gpu in plan.hot.values() if gpu == g.index) <= g.n_slots
        assert g.fixed_bytes + g.n_slots * g.slot_bytes <= g.budget_bytes


def test_budget_fills_slots_after_the_fixed_part(synth_model):
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    expert = max(e.n_bytes for e in desc.experts.values())
    plan = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(600 * MiB,), ram_bytes=3 * expert, ctx=256))
    g = plan.gpus[0]
    assert g.n_slots == min((g.budget_bytes - g.fixed_bytes) // expert, len(desc.experts))
    assert g.kv_bytes == desc.config.n_layer * 256 * desc.config.n_head_kv * (
        desc.config.head_dim_k + desc.config.head_dim_v) * 2
    check_partition(desc, plan)
    assert not plan.gpus[0].runtime_measured  # no GPU here: the runtime context is a stated guess


def test_small_budgets_leave_experts_warm_and_cold(synth_model):
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    expert = max(e.n_bytes for e in desc.experts.values())
    probe = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(600 * MiB,), ctx=256))
    fixed = probe.gpus[0].fixed_bytes
    plan = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(fixed + 5 * expert,), ram_bytes=4 * expert, ctx=256))
    assert (len(plan.hot), len(plan.warm)) == (5, 4)
    assert len(plan.cold) == len(desc.experts) - 9
    check_partition(desc, plan)
    # uniform ranking spreads hot slots evenly over layers
    per_layer = np.bincount([e.layer for e in plan.hot], minlength=desc.config.n_layer)
    assert per_layer.max() - per_layer.min() <= 1


def test_profile_ranking_puts_the_hottest_experts_in_vram(synth_model):
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    c = desc.config
    freq = np.random.default_rng(0).random((c.n_layer, c.n_expert))
    expert = max(e.n_bytes for e in desc.experts.values())
    fixed = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(600 * MiB,), ctx=256)).gpus[0].fixed_bytes
    plan = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(fixed + 4 * expert,), ram_bytes=0, ctx=256), expert_freq=freq)
    top4 = sorted(desc.experts, key=lambda e: -freq[e.layer, e.expert])[:4]
    assert set(plan.hot) == set(top4) and plan.ranked_by == "profile"


def test_fixed_part_that_cannot_fit_says_how_much_and_what_would(synth_model):
    desc = open_model(synth_model("llama", qtype="Q8_0"))
    with pytest.raises(MoeTierError) as err:
        plan_tiers(desc, NO_GPU, Budget(vram_bytes=(600 * MiB,), ctx=1_000_000))
    msg = str(err.value)
    assert "cannot hold the fixed part" in msg and "KV cache" in msg and "--ctx" in msg and "\n" not in msg


def test_measured_gpus_split_layers_and_pool_slots(synth_model):
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    gpus = tuple(GpuInfo(i, f"card{i}", 1024 * MiB, 1024 * MiB - 300 * MiB) for i in range(2))
    plan = plan_tiers(desc, Machine(gpus, 64 * 1024**3, "test"), Budget(ctx=256))
    assert [g.runtime_bytes for g in plan.gpus] == [300 * MiB, 300 * MiB]
    assert all(g.runtime_measured for g in plan.gpus)
    layers = [layer for g in plan.gpus for layer in g.layers]
    assert layers == list(range(desc.config.n_layer))
    assert set(plan.hot.values()) == {0, 1} or len(plan.hot) == len(desc.experts)
    for eid, gpu in plan.hot.items():  # experts live on the card that holds their layer when it has room
        if eid.layer in plan.gpus[gpu].layers:
            continue
        home = next(g for g in plan.gpus if eid.layer in g.layers)
        assert sum(1 for v in plan.hot.values() if v == home.index) == home.n_slots


def test_a_zero_budget_leaves_that_gpu_out(synth_model):
    """--vram 1GiB,0 on a two-GPU machine plans GPU 0 alone: every layer there, no slots on GPU 1."""
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    gpus = tuple(GpuInfo(i, f"card{i}", 1024 * MiB, 1024 * MiB - 300 * MiB) for i in range(2))
    plan = plan_tiers(desc, Machine(gpus, 64 * 1024**3, "test"), Budget(vram_bytes=(1024 * MiB, 0), ctx=256))
    assert [g.index for g in plan.gpus] == [0]
    assert list(plan.gpus[0].layers) == list(range(desc.config.n_layer)) and set(plan.hot.values()) <= {0}


def test_remembered_fit_caps_the_slots(synth_model, tmp_path):
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    machine = Machine((GpuInfo(0, "cardA", 1024 * MiB, 900 * MiB),), 64 * 1024**3, "rt1")
    store = FitStore(tmp_path / "fits.json")
    free = plan_tiers(desc, machine, Budget(ctx=256), fits=store)
    store.remember(desc.fingerprint, "cardA", "rt1", {"n_slots": 3})
    capped = plan_tiers(desc, machine, Budget(ctx=256), fits=store)
    assert free.gpus[0].n_slots > 3 and capped.gpus[0].n_slots == 3 and len(capped.hot) == 3
    assert "remembered" in capped.notes[0]
    other_runtime = Machine(machine.gpus, machine.ram_available_bytes, "rt2")
    assert plan_tiers(desc, other_runtime, Budget(ctx=256), fits=store).gpus[0].n_slots == free.gpus[0].n_slots


def test_spare_ram_pins_hot_experts_too(synth_model):
    """With RAM for everything, a hot expert keeps a pinned copy: giving up its slot never means a disk read."""
    desc = open_model(synth_model("qwen3moe", qtype="Q8_0"))
    expert = max(e.n_bytes for e in desc.experts.values())
    fixed = plan_tiers(desc, NO_GPU, Budget(vram_bytes=(600 * MiB,), ctx=256)).gpus[0].fixed_bytes
    vram = (fixed + 5 * expert,)
    roomy = plan_tiers(desc, NO_GPU, Budget(vram_bytes=vram, ram_bytes=len(desc.experts) * expert, ctx=256))
    assert not roomy.cold and set(roomy.pinned) == set(desc.experts) and set(roomy.pinned_hot) == set(roomy.hot)
    tight = plan_tiers(desc, NO_GPU, Budget(vram_bytes=vram, ram_bytes=4 * expert, ctx=256))
    assert tight.pinned_hot == () and tight.pinned == tight.warm
    check_partition(desc, roomy)
