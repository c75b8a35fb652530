"""Tier planner: what never shards goes first on each GPU, expert slots fill the rest.

Per GPU:  budget = runtime context (measured) + dense layers placed there + KV cache + scratch
                   + n_slots * slot_bytes
Routed experts are ranked (by a routing profile when one is given, else evenly across layers)
and take GPU slots (hot), then pinned RAM (warm), then stay in the file (cold). RAM left over holds
pinned copies of hot experts too, so that a slot can be given up without a later read from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe_tier.errors import MoeTierError
from moe_tier.fits import FitStore
from moe_tier.machine import GpuInfo, Machine
from moe_tier.reader import Category, ExpertId, ModelDesc
from moe_tier.units import format_bytes

KV_BYTES_PER_ELEMENT = 2  # f16 KV cache, as llama.cpp's default
RUNTIME_GUESS_BYTES = 512 * 1024**2  # only when planning for a GPU that is not here to measure
DEQUANT_SCRATCH_BYTES = 32 << 20  # kernels.gpu.DEQUANT_CHUNK_VALUES float16 values: prefill's decoded weight chunk


@dataclass(frozen=True)
class Budget:
    vram_bytes: tuple[int, ...] | None = None  # one per GPU, or one for all; None: measured free memory
    ram_bytes: int | None = None  # None: 80% of available host RAM
    ctx: int = 4096
    ubatch: int = 512  # prefill chunk: sizes the activation scratch


@dataclass(frozen=True)
class GpuPlan:
    index: int
    name: str
    budget_bytes: int
    runtime_bytes: int
    runtime_measured: bool
    dense_bytes: int
    kv_bytes: int
    scratch_bytes: int
    layers: tuple[int, ...]
    slot_bytes: int
    n_slots: int

    @property
    def fixed_bytes(self) -> int:
        return self.runtime_bytes + self.dense_bytes + self.kv_bytes + self.scratch_bytes


@dataclass(frozen=True)
class TierPlan:
    gpus: tuple[GpuPlan, ...]
    hot: dict[ExpertId, int]  # expert -> GPU index
    warm: tuple[ExpertId, ...]
    cold: tuple[ExpertId, ...]
    ram_budget_bytes: int
    warm_bytes: int
    ctx: int
    ranked_by: str  # "profile" or "uniform"
    notes: tuple[str, ...] = field(default=())
    pinned_hot: tuple[ExpertId, ...] = ()  # hot experts that also keep a pinned copy: evicting them costs no read

    @property
    def pinned(self) -> tuple[ExpertId, ...]:
        """Every expert with a copy in pinned RAM (the warm tier's arena)."""
        return self.warm + self.pinned_hot


def plan_tiers(
    desc: ModelDesc,
    machine: Machine,
    budget: Budget,
    expert_freq: np.ndarray | None = None,
    fits: FitStore | None = None,
) -> TierPlan:
    """Place every routed expert; MoeTierError if a GPU cannot hold even its fixed part."""
    gpus = _gpus_for(machine, budget)
    layer_split = _split_layers(desc, gpus)
    slot_bytes = max(e.n_bytes for e in desc.experts.values())
    plans, notes = [], []
    for gpu, layers in zip(gpus, layer_split):
        dense = _dense_bytes(desc, layers, last=gpu is gpus[-1])
        kv = _kv_bytes(desc, len(layers), budget.ctx)
        scratch = _scratch_bytes(desc, budget, last=gpu is gpus[-1])
        runtime = gpu.runtime_bytes if gpu.free_bytes < gpu.total_bytes else RUNTIME_GUESS_BYTES
        usable = gpu.total_bytes
        fixed = runtime + dense + kv + scratch
        if fixed > usable:
            raise MoeTierError(desc.path, _no_fit_message(desc, gpu, runtime, dense, kv, scratch, budget, len(layers)))
        n_slots = min((usable - fixed) // slot_bytes, len(desc.experts))  # more slots than experts is waste
        if fits is not None and (fit := fits.recall(desc.fingerprint, gpu.name, machine.runtime)):
            if fit["n_slots"] < n_slots:
                notes.append(f"GPU {gpu.index}: {fit['n_slots']} slots, the fit remembered from a previous run")
                n_slots = fit["n_slots"]
        plans.append(
            GpuPlan(gpu.index, gpu.name, gpu.total_bytes, runtime, gpu.free_bytes < gpu.total_bytes,
                    dense, kv, scratch, tuple(layers), slot_bytes, int(n_slots))
        )
    ranked = _rank(desc, expert_freq)
    hot = _assign_slots(ranked, plans, desc)
    ram = budget.ram_bytes if budget.ram_bytes is not None else int(machine.ram_available_bytes * 0.8)
    warm, warm_bytes = [], 0
    rest = [e for e in ranked if e not in hot]
    for eid in rest:
        size = desc.experts[eid].n_bytes
        if warm_bytes + size > ram:
            break
        warm.append(eid)
        warm_bytes += size
    cold = tuple(rest[len(warm):])
    pinned_hot = []
    if not cold:  # RAM left after the warm tier: pinned copies of hot experts, hottest first
        for eid in (e for e in ranked if e in hot):
            size = desc.experts[eid].n_bytes
            if warm_bytes + size > ram:
                break
            pinned_hot.append(eid)
            warm_bytes += size
    return TierPlan(tuple(plans), hot, tuple(warm), cold, ram, warm_bytes, budget.ctx,
                    "profile" if expert_freq is not None else "uniform", tuple(notes), tuple(pinned_hot))


def _gpus_for(machine: Machine, budget: Budget) -> list[GpuInfo]:
    """Measured GPUs capped by the user's budget; without GPUs, one planned GPU per budget given."""
    vram = budget.vram_bytes
    if machine.gpus:
        if vram and len(vram) not in (1, len(machine.gpus)):
            raise MoeTierError(None, f"--vram lists {len(vram)} budgets for {len(machine.gpus)} GPUs")
        out = []
        for g in machine.gpus:
            cap = vram[0] if vram and len(vram) == 1 else vram[g.index] if vram else g.total_bytes
            if cap == 0:  # "--vram 24GiB,0": this GPU is left out
                continue
            out.append(GpuInfo(g.index, g.name, min(cap, g.total_bytes), min(cap, g.total_bytes) - g.runtime_bytes))
        return out
    # Planned, not measured: free == total marks the runtime context as unknown.
    return [GpuInfo(i, "planned GPU", v, v) for i, v in enumerate(vram or ())]


def _split_layers(desc: ModelDesc, gpus: list[GpuInfo]) -> list[list[int]]:
    """Contiguous layer ranges, proportional to each GPU's memory: activations cross cards, weights don't."""
    n = desc.config.n_layer
    if not gpus:
        return []
    total = sum(g.total_bytes for g in gpus)
    bounds, acc = [0], 0
    for g in gpus[:-1]:
        acc += g.total_bytes
        bounds.append(round(n * acc / total))
    bounds.append(n)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(len(gpus))]


def _dense_bytes(desc: ModelDesc, layers: list[int], last: bool) -> int:
    """Dense, router and shared tensors of these layers; the output head on the last GPU.

    The token embedding stays in host memory: each step reads only the rows of its tokens.
    """
    wanted = set(layers)
    total = 0
    for t in desc.tensors.values():
        if t.category is Category.ROUTED:
            continue
        if t.layer in wanted or (t.layer is None and last and not t.name.startswith("token_embd")):
            total += t.n_bytes
    return total


def _kv_bytes(desc: ModelDesc, n_layers: int, ctx: int) -> int:
    c = desc.config
    return n_layers * ctx * c.n_head_kv * (c.head_dim_k + c.head_dim_v) * KV_BYTES_PER_ELEMENT


def _scratch_bytes(desc: ModelDesc, budget: Budget, last: bool) -> int:
    """Largest live activations of one prefill chunk (f32): hidden states, FFN, attention scores, logits; and the
    float16 weight chunk that prefill's matmuls decode for cuBLAS."""
    c = desc.config
    ff = max(c.n_ff, c.n_ff_exp * c.n_expert_used, c.n_ff_shexp)
    per_token = 8 * c.n_embd + 3 * ff + c.n_head * budget.ctx + (c.n_vocab if last else 0)
    return budget.ubatch * per_token * 4 + DEQUANT_SCRATCH_BYTES


def _rank(desc: ModelDesc, expert_freq: np.ndarray | None) -> list[ExpertId]:
    """Hottest first. Uniform: rank r of every layer before rank r+1, so layers share slots evenly."""
    experts = list(desc.experts)
    if expert_freq is None:
        return sorted(experts, key=lambda e: (e.expert, e.layer))
    return sorted(experts, key=lambda e: (-float(expert_freq[e.layer, e.expert]), e.layer, e.expert))


def _assign_slots(ranked: list[ExpertId], plans: list[GpuPlan], desc: ModelDesc) -> dict[ExpertId, int]:
    """Prefer the GPU that holds the expert's layer (no activation transfer); any free slot otherwise."""
    free = {p.index: p.n_slots for p in plans}
    owner = {layer: p.index for p in plans for layer in p.layers}
    hot = {}
    for eid in ranked:
        if not any(free.values()):
            break
        home = owner.get(eid.layer)
        gpu = home if home is not None and free[home] else max(free, key=free.get)
        hot[eid] = gpu
        free[gpu] -= 1
    return hot


def _no_fit_message(desc, gpu, runtime, dense, kv, scratch, budget, n_layers) -> str:
    need = runtime + dense + kv + scratch
    kv_per_token = kv // max(budget.ctx, 1)
    scratch_per_ctx = budget.ubatch * desc.config.n_head * 4
    spare = gpu.total_bytes - runtime - dense - (scratch - scratch_per_ctx * budget.ctx)
    max_ctx = spare // (kv_per_token + scratch_per_ctx) if spare > 0 else 0
    hint = f"--ctx {max_ctx // 256 * 256} would fit" if max_ctx >= 256 else f"needs --vram of at least {format_bytes(need)}"
    return (
        f"GPU {gpu.index} ({gpu.name}) budget {format_bytes(gpu.total_bytes)} cannot hold the fixed part: "
        f"runtime {format_bytes(runtime)} + dense {format_bytes(dense)} ({n_layers} layers) + KV cache "
        f"{format_bytes(kv)} (ctx {budget.ctx}) + scratch {format_bytes(scratch)} = {format_bytes(need)}; {hint}"
    )
