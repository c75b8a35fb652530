"""What a synthetic model looks like: one frozen dataclass of sizes, tiny defaults per architecture, presets.

Sizes follow llama.cpp's hparams (src/models/<arch>.cpp): `n_ff_exp` is one routed expert's FFN width,
`n_ff_shared` the whole shared-expert width (qwen2moe's shared FFN, deepseek2's shared experts side by side),
`n_ff_dense` the FFN width of deepseek2's leading dense layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from moe_tier.errors import MoeTierError
from moe_tier.synth.tokenizer import MIN_VOCAB

ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss")
LAYOUTS = ("merged", "per-expert")

# Written with gguf's numpy quantizers: the types gguf.quants.quantize supports, less the ternary TQ1_0/TQ2_0.
GGUF_QTYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4)
# Written as F32, then quantized by llama.cpp (llama_model_quantize with pure=True).
LLAMA_QTYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS, QT.IQ4_NL)
QTYPES = GGUF_QTYPES + LLAMA_QTYPES


@dataclass(frozen=True)
class SynthSpec:
    """Sizes of one synthetic MoE model; the same spec always gives the same bytes."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int = 512
    n_ff_shared: int = 0
    n_ff_dense: int = 0
    n_leading_dense: int = 0
    rope_dim: int = 0  # 0: the whole head is rotated
    v_head_dim: int = 0  # 0: same as head_dim
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    sliding_window: int = 0
    n_ctx: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    layout: str = "merged"
    qtype: QT = QT.F32

    def __post_init__(self) -> None:
        if isinstance(self.qtype, str):
            object.__setattr__(self, "qtype", parse_qtype(self.qtype))
        self._validate()

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def head_dim_v(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def n_expert_shared(self) -> int:
        """deepseek2 counts shared experts of width n_ff_exp; qwen2moe has one shared FFN."""
        return self.n_ff_shared // self.n_ff_exp if self.arch == "deepseek2" else int(self.n_ff_shared > 0)

    def replace(self, **changes) -> "SynthSpec":
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise MoeTierError(None, f"synth {self.arch}: {problem}")

        need(self.arch in ARCHS, f"unknown arch (known: {', '.join(ARCHS)})")
        need(self.layout in LAYOUTS, f"unknown layout {self.layout!r} (known: {', '.join(LAYOUTS)})")
        need(self.layout == "merged" or self.arch == "llama", "the per-expert layout exists only for llama (Mixtral)")
        need(self.qtype in QTYPES, f"qtype {self.qtype.name} not supported")
        for name in ("n_layer", "n_embd", "n_ff_exp", "n_expert", "n_expert_used", "n_head", "n_head_kv", "head_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.n_expert_used <= self.n_expert, "n_expert_used must not exceed n_expert")
        need(self.n_expert <= 512, "n_expert must be at most 512 (LLAMA_MAX_EXPERTS)")
        need(self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv")
        need(self.n_vocab >= MIN_VOCAB, f"n_vocab must be at least {MIN_VOCAB} (specials, 256 bytes, one piece)")
        need(self.n_rot % 2 == 0 and self.n_rot <= self.head_dim, "rope_dim must be even and at most head_dim")
        for name in ("n_embd", "n_ff_exp", "head_dim", "n_ff_shared", "n_ff_dense", "q_lora_rank", "kv_lora_rank"):
            need(getattr(self, name) % 32 == 0, f"{name} must be a multiple of 32 (quant block size)")
        need(self.head_dim_v % 32 == 0 and (self.head_dim - self.n_rot) % 32 == 0 or self.arch != "deepseek2",
             "deepseek2 head dims (nope part, v) must be multiples of 32")
        if self.arch in ("olmoe", "qwen2moe"):
            need(self.n_head * self.head_dim == self.n_embd, "attention width n_head * head_dim must equal n_embd")
        if self.arch == "olmoe":
            need(self.n_head_kv == self.n_head, "olmoe normalises K over its full width: n_head_kv must equal n_head")
        if self.arch == "qwen2moe":
            need(self.n_ff_shared > 0, "qwen2moe needs a shared expert (n_ff_shared > 0)")
        if self.arch == "deepseek2":
            need(self.n_head_kv == 1, "deepseek2 MLA is stored as MQA: n_head_kv must be 1")
            need(self.q_lora_rank > 0 and self.kv_lora_rank > 0, "deepseek2 needs q_lora_rank and kv_lora_rank")
            need(self.rope_dim > 0 and self.head_dim > self.rope_dim, "deepseek2 needs 0 < rope_dim < head_dim")
            need(self.n_ff_shared % self.n_ff_exp == 0, "deepseek2 n_ff_shared must be a multiple of n_ff_exp")
            need(0 <= self.n_leading_dense < self.n_layer, "n_leading_dense must be below n_layer")
            need(self.n_leading_dense == 0 or self.n_ff_dense > 0, "leading dense layers need n_ff_dense")
        else:
            need(self.n_leading_dense == 0, "leading dense layers exist only for deepseek2")
        if self.arch == "gpt-oss":
            need(self.sliding_window > 0, "gpt-oss needs a sliding window")


def parse_qtype(name: str) -> QT:
    try:
        qtype = QT[name.upper()]
    except KeyError:
        raise MoeTierError(None, f"unknown quant type {name!r} (known: {', '.join(q.name for q in QTYPES)})") from None
    if qtype not in QTYPES:
        raise MoeTierError(None, f"quant type {qtype.name} not supported (known: {', '.join(q.name for q in QTYPES)})")
    return qtype


# Tiny models: hidden 256 so 256-element K-quant blocks apply to every matrix row.
_TINY = {
    "llama": dict(n_layer=2, n_expert=4, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=64, rope_theta=1e6),
    "qwen2moe": dict(n_layer=2, n_expert=4, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=64,
                     n_ff_shared=512, rope_theta=1e6, rms_eps=1e-6),
    "qwen3moe": dict(n_layer=2, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=64,
                     rope_theta=1e6, rms_eps=1e-6),
    "olmoe": dict(n_layer=2, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=4, head_dim=64),
    "deepseek2": dict(n_layer=3, n_leading_dense=1, n_ff_dense=512, n_expert=8, n_expert_used=2, n_ff_shared=256,
                      n_head=4, n_head_kv=1, head_dim=96, rope_dim=32, v_head_dim=64, q_lora_rank=256,
                      kv_lora_rank=256, rms_eps=1e-6),
    "gpt-oss": dict(n_layer=2, n_expert=4, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=64, sliding_window=16,
                    rope_theta=150000.0),
}

PRESETS = ("tiny", "mixtral-8x7b")


def tiny(arch: str, **overrides) -> SynthSpec:
    """A model of a few MiB for tests: 256 hidden, 256-wide experts, 2-3 layers."""
    if arch not in _TINY:
        raise MoeTierError(None, f"synth: unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    fields = dict(arch=arch, n_embd=256, n_ff_exp=256) | _TINY[arch] | overrides
    return SynthSpec(**fields)


def mixtral_8x7b(**overrides) -> SynthSpec:
    """Mixtral-8x7B's shape (about 26 GB in Q4_K); meant for the fast writer."""
    fields = dict(arch="llama", n_layer=32, n_embd=4096, n_ff_exp=14336, n_expert=8, n_expert_used=2, n_head=32,
                  n_head_kv=8, head_dim=128, n_vocab=32000, n_ctx=32768, rope_theta=1e6, qtype=QT.Q4_K) | overrides
    return SynthSpec(**fields)


def preset(name: str, arch: str = "llama", **overrides) -> SynthSpec:
    if name == "tiny":
        return tiny(arch, **overrides)
    if name == "mixtral-8x7b":
        if arch != "llama":
            raise MoeTierError(None, "synth: preset mixtral-8x7b is a llama-architecture model")
        return mixtral_8x7b(**overrides)
    raise MoeTierError(None, f"synth: unknown preset {name!r} (known: {', '.join(PRESETS)})")
