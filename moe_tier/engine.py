"""The public API: open a GGUF MoE model, tokenize, score, generate.

    from moe_tier import Engine
    eng = Engine.open("model.gguf", vram=None, ram=None, ctx=2048)
    eng.logits(eng.tokenize("Hello"))      # (n_tokens, n_vocab) float32
    eng.generate("Hello", max_tokens=32)   # greedy text
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from moe_tier.errors import MoeTierError
from moe_tier.fits import FitStore
from moe_tier.host_ops import HostOps
from moe_tier.host_tiers import HostExperts
from moe_tier.machine import probe
from moe_tier.models import Segment, family
from moe_tier.models.base import RoutingObserver
from moe_tier.plan import Budget, TierPlan, plan_tiers
from moe_tier.reader import Category, ExpertId, ModelDesc, open_model
from moe_tier.sampling import Sampler, SamplingConfig
from moe_tier.stats import EngineStats
from moe_tier.tensors import Weights
from moe_tier.tokenizer import TextStream, Tokenizer
from moe_tier.units import parse_bytes_list

PREFILL_CHUNK = 512  # tokens per prefill step: bounds the activation scratch the plan reserves


class Engine:
    def __init__(self, desc: ModelDesc, plan: TierPlan, ctx: int, policy: str = "planner",
                 expert_freq: np.ndarray | None = None, lookahead: int = 0, cpu_share: float | None = None):
        self.desc, self.plan, self.ctx, self.policy, self.expert_freq = desc, plan, ctx, policy, expert_freq
        self.lookahead, self.cpu_share = lookahead, cpu_share
        self.stats = EngineStats()
        self.weights = weights = Weights(desc)
        measured_gpu = bool(plan.gpus) and plan.gpus[0].runtime_measured
        ops = self._gpu_ops(weights) if measured_gpu else self._host_ops(weights)
        self.model = family(desc.arch, desc.path)(desc.config, ops)
        self.stats.dense_bytes_per_token = sum(
            t.n_bytes for t in desc.tensors.values()
            if t.category is not Category.ROUTED and not t.name.startswith("token_embd")
        )

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """llama.cpp's vocabulary, loaded on first use: scoring token ids needs none."""
        return Tokenizer(self.desc.path)

    def _host_ops(self, weights: Weights) -> HostOps:
        # The CPU engine has no VRAM: experts planned hot (for a --vram with no GPU here) stay in RAM too.
        experts = HostExperts(self.desc, [*self.plan.hot, *self.plan.warm], self.stats)
        return HostOps(self.desc.config, weights, experts)

    def _gpu_ops(self, weights: Weights):
        """Each layer's dense weights and KV cache on the GPU the plan gave it, routed experts in the slot pool
        of every GPU. Decode keeps routing on the device when every expert is hot or pinned (moe_decode); else
        it reads it back per layer."""
        import torch

        from moe_tier.cpu_share import side_by_side
        from moe_tier.gpu_ops import GpuOps
        from moe_tier.moe_decode import DeviceMoE, device_path_possible, lookaheads
        from moe_tier.moe_gpu import moe_ffn_gpu
        from moe_tier.tiers.gpu_pool import GpuTiers, TierConfig
        from moe_tier.tiers.links import balanced_share

        k = self.desc.config.n_expert_used
        config = TierConfig(policy=self.policy, prior=use_per_token(self.desc, self.expert_freq),
                            stage_slots=(self.lookahead + 2) * k if self.lookahead else k)
        self.tiers = tiers = GpuTiers(self.desc, self.plan, self.stats, config, fits=FitStore())
        self.read_back_why = device_path_possible(tiers)
        on_device = self.read_back_why is None
        if on_device:
            ahead = lookaheads(weights, tiers, self.lookahead) if self.lookahead else None
            share = self.cpu_share
            if share is None:  # split each staged expert between the CPU and the link, if any can miss
                all_hot = len(tiers.table.slot_of) == len(self.desc.experts)
                share = 0.0 if all_hot else balanced_share(tiers.speeds.cpu_bytes_per_s, tiers.speeds.h2d_bytes_per_s)
                rates = side_by_side(tiers, share) if share else None
                if rates is not None:  # the share from rates measured at once; their sum is what host RAM serves
                    share = balanced_share(*rates)
                    tiers.speeds = replace(tiers.speeds, host_bytes_per_s=sum(rates))
            moe = DeviceMoE(tiers, ahead, share)
        else:
            moe = lambda x, routing, layer: moe_ffn_gpu(x, routing, layer, tiers)
        layer_devices = {layer: torch.device("cuda", g.index) for g in self.plan.gpus for layer in g.layers}
        return GpuOps(self.desc.config, weights, moe, torch.device("cuda", self.plan.gpus[0].index), on_device,
                      layer_devices)

    @property
    def decode_mode(self) -> str | None:
        """How a GPU engine decodes, for the run summary (None on the CPU engine)."""
        if getattr(self, "tiers", None) is None:
            return None
        if self.read_back_why is not None:
            return f"routing read back every layer: {self.read_back_why}"
        mode = "routing stays on the GPU, " + ("one CUDA graph a step" if self._graphs is not None
                                                 else "no graph (the step spans several GPUs)")
        cpu = self.model.ops.moe.cpu
        if cpu is not None:
            mode += f"; the CPU computes {cpu.fraction():.0%} of each staged expert"
        return mode

    @cached_property
    def _graphs(self):
        """Decode steps as CUDA graphs, where a step has no host round trip and one GPU runs it all."""
        ops = self.model.ops
        if getattr(ops, "device_routing", False) and len(self.tiers.arena) == 1:
            from moe_tier.gpu_graph import DecodeGraphs

            return DecodeGraphs(self.model, ops, ops.moe)
        return None

    @classmethod
    def open(cls, path: str | Path, vram: int | str | None = None, ram: int | str | None = None,
             ctx: int = 2048, expert_freq: np.ndarray | None = None, policy: str = "planner",
             lookahead: int = 0, cpu_share: float | None = None) -> Engine:
        """vram/ram: bytes or sizes like "12GiB" (vram may list one per GPU); expert_freq (layer, expert)
        from a routing profile ranks experts for the tiers; policy (tiers.slots.POLICY_NAMES) picks slot victims
        (planner: the live planner, tiers/live_planner.py, which also decides misses and prefetches);
        lookahead: d > 0: decode on the GPU stages each MoE layer's predicted warm experts while the d layers before
        it run (moe_decode.Lookahead; it takes (d + 1) k more staging slots); 0: off. cpu_share: the fraction of
        each staged expert the CPU computes while the GPU stages the rest (cpu_share.py); None: from the measured
        rates where some expert is not hot; 0: off."""
        desc = open_model(path)
        if ctx <= 0:
            raise MoeTierError(path, f"context length must be positive, got {ctx}")
        budget = Budget(vram_bytes=_sizes(vram), ram_bytes=_sizes(ram)[0] if ram is not None else None, ctx=ctx)
        plan = plan_tiers(desc, probe(), budget, expert_freq=expert_freq, fits=FitStore())
        return cls(desc, plan, ctx, policy, expert_freq, lookahead, cpu_share)

    @property
    def n_vocab(self) -> int:
        return self.desc.config.n_vocab

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _check(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise MoeTierError(self.desc.path, "empty prompt")
        if len(ids) > self.ctx:
            raise MoeTierError(self.desc.path, f"prompt of {len(ids)} tokens is longer than the context ({self.ctx})")
        bad = ids[(ids < 0) | (ids >= self.n_vocab)]
        if len(bad):
            raise MoeTierError(self.desc.path, f"token id {int(bad[0])} out of range (vocabulary {self.n_vocab})")
        return ids

    def logits(self, tokens, observer: RoutingObserver | None = None) -> np.ndarray:
        """(len(tokens), n_vocab) float32 for a fresh sequence."""
        ids = self._check(tokens)
        cache = self.model.new_cache(len(ids))
        out = [self.step(cache, ids[i : i + PREFILL_CHUNK], observer, last_only=False)
               for i in range(0, len(ids), PREFILL_CHUNK)]
        return np.concatenate(out).astype(np.float32)

    def step(self, cache, ids: np.ndarray, observer: RoutingObserver | None = None, last_only: bool = True) -> np.ndarray:
        """One forward step of a sequence: ids continue `cache` (from model.new_cache); logits on the host."""
        if len(ids) == 1 and observer is None and self._graphs is not None:
            return self.model.ops.to_host(self._graphs.step(cache, int(ids[0])))
        return self.model.ops.to_host(self.model.forward(ids, [Segment(cache, 0, len(ids))], observer, last_only))

    def stream(self, prompt: str, max_tokens: int, sampling: SamplingConfig = SamplingConfig(),
               chat: bool = False, observer: RoutingObserver | None = None) -> Iterator[str]:
        """Yield text as it is generated; stops at end-of-generation or max_tokens."""
        if chat:
            ids = self.tokenizer.encode(self.tokenizer.apply_chat(prompt), add_special=False)
        else:
            ids = self.tokenizer.encode(prompt)
        text = TextStream(self.tokenizer)
        for token in self.generate_tokens(ids, max_tokens, sampling, observer):
            yield text.push(token)
        yield text.flush()

    def generate_tokens(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                        observer: RoutingObserver | None = None) -> Iterator[int]:
        """The decode loop: prefill in chunks, then one token per step against the KV cache."""
        ids = self._check(prompt_ids)
        if len(ids) + max_tokens > self.ctx:
            raise MoeTierError(self.desc.path, f"prompt ({len(ids)} tokens) + {max_tokens} new tokens "
                                               f"exceed the context ({self.ctx})")
        sampler = Sampler(sampling)
        cache = self.model.new_cache(len(ids) + max_tokens)
        t0 = time.perf_counter()
        for i in range(0, len(ids), PREFILL_CHUNK):
            logits = self.step(cache, ids[i : i + PREFILL_CHUNK], observer, last_only=True)
        self.stats.prompt_tokens += len(ids)
        self.stats.prompt_seconds += time.perf_counter() - t0
        expert_bytes_before = self.stats.expert_bytes()
        t0 = time.perf_counter()
        for n in range(max_tokens):
            token = sampler(logits[-1])
            if self.tokenizer.is_end(token):
                break
            self.stats.generated_tokens += 1
            yield token
            if n + 1 < max_tokens:
                logits = self.step(cache, np.array([token]), observer, last_only=True)
        self.stats.generate_seconds += time.perf_counter() - t0
        account = getattr(self.model.ops.moe, "account", None)  # the device path counts a step one step late
        if account is not None:
            account()
        self.stats.decode_expert_bytes += self.stats.expert_bytes() - expert_bytes_before

    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0, **sampling) -> str:
        cfg = SamplingConfig(temperature=temperature, seed=seed, **sampling)
        return "".join(self.stream(prompt, max_tokens, cfg))


def use_per_token(desc: ModelDesc, expert_freq: np.ndarray | None) -> dict[ExpertId, float] | None:
    """A profile's selection counts (layer, expert) as each expert's chance of being chosen by a token."""
    if expert_freq is None:
        return None
    per_layer = expert_freq.sum(axis=1, keepdims=True) / desc.config.n_expert_used  # tokens seen per layer
    chance = np.divide(expert_freq, per_layer, out=np.zeros_like(expert_freq, dtype=float), where=per_layer > 0)
    return {eid: float(chance[eid.layer, eid.expert]) for eid in desc.experts}


def _sizes(value: int | str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    try:
        return tuple(parse_bytes_list(value))
    except ValueError as err:
        raise MoeTierError(None, str(err)) from None
