"""Model hyper-parameters, built in one place from GGUF metadata keys.

Per-architecture semantics that the GGUF does not state (rope style, whether top-k weights are
renormalised, the gating function) follow llama.cpp's `src/models/<arch>.cpp`, which is the
reference this project must match.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gguf import GGUFValueType, Keys


class Gating(enum.Enum):
    """How router logits become expert weights (llama.cpp's llama_expert_gating_func_type)."""

    SOFTMAX = 1  # softmax over all experts, then top-k
    SIGMOID = 2  # sigmoid per expert (DeepSeek-V3 style), top-k on sigmoid (+ bias)
    SOFTMAX_WEIGHT = 3  # top-k on logits, softmax over the k chosen (gpt-oss)


class RopeStyle(enum.Enum):
    NORM = "norm"  # rotate adjacent pairs (x0, x1), (x2, x3) ...
    NEOX = "neox"  # rotate halves (x_i, x_{i+d/2})


@dataclass(frozen=True)
class ArchTraits:
    """What llama.cpp hard-codes per architecture rather than reading from the file."""

    rope: RopeStyle
    gating: Gating
    weights_norm: bool  # renormalise the k chosen weights to sum to 1
    qk_norm: bool = False  # RMSNorm on q and k (per head, or over all heads for olmoe)
    engine: bool = True  # moe-tier's engine runs it (False: catalog and plan only)


ARCH_TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(RopeStyle.NORM, Gating.SOFTMAX, weights_norm=True),
    "qwen2moe": ArchTraits(RopeStyle.NEOX, Gating.SOFTMAX, weights_norm=False),
    "qwen3moe": ArchTraits(RopeStyle.NEOX, Gating.SOFTMAX, weights_norm=True, qk_norm=True),
    "olmoe": ArchTraits(RopeStyle.NEOX, Gating.SOFTMAX, weights_norm=False, qk_norm=True),
    # deepseek2's gating and normalisation come from the file (see from_metadata)
    "deepseek2": ArchTraits(RopeStyle.NORM, Gating.SOFTMAX, weights_norm=False, engine=False),
    "gpt-oss": ArchTraits(RopeStyle.NEOX, Gating.SOFTMAX_WEIGHT, weights_norm=False, engine=False),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    norm_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    rope: RopeStyle
    n_expert: int
    n_expert_used: int
    n_ff: int  # dense FFN width (leading dense layers), 0 if none
    n_ff_exp: int  # routed expert FFN width
    n_ff_shexp: int  # shared expert FFN width, 0 if none
    n_expert_shared: int
    n_leading_dense: int
    gating: Gating
    weights_norm: bool
    weights_scale: float
    qk_norm: bool
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.n_expert_used > self.n_expert:
            raise ValueError(f"expert_used_count {self.n_expert_used} > expert_count {self.n_expert}")
        if self.n_head_kv and self.n_head % self.n_head_kv:
            raise ValueError(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_head_kv}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.n_leading_dense, self.n_layer))


def _key(template: str, arch: str) -> str:
    return template.format(arch=arch)


def from_metadata(arch: str, kv: dict, n_vocab: int, tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """Build the config from GGUF key/values, with llama.cpp's defaults for absent keys.

    `tensor_shapes` fills widths that old files leave out (for example Mixtral files carry no
    expert_feed_forward_length: the expert width is read off the expert tensors, as llama.cpp does).
    """
    traits = ARCH_TRAITS[arch]

    def get(template: str, default=None):
        value = kv.get(_key(template, arch), default)
        if isinstance(value, list):  # per-layer arrays: moe-tier supports uniform values
            value = max(value) if value else default
        return value

    n_embd = int(get(Keys.LLM.EMBEDDING_LENGTH))
    n_head = int(get(Keys.Attention.HEAD_COUNT, 0))
    n_head_kv = int(get(Keys.Attention.HEAD_COUNT_KV, n_head))
    head_dim_k = int(get(Keys.Attention.KEY_LENGTH, n_embd // n_head if n_head else 0))
    head_dim_v = int(get(Keys.Attention.VALUE_LENGTH, n_embd // n_head if n_head else 0))
    n_layer = int(get(Keys.LLM.BLOCK_COUNT))
    n_expert = int(get(Keys.LLM.EXPERT_COUNT, 0))
    n_expert_used = int(get(Keys.LLM.EXPERT_USED_COUNT, 0))
    n_ff = int(get(Keys.LLM.FEED_FORWARD_LENGTH, 0))
    n_ff_exp = int(get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0))
    if not n_ff_exp:
        n_ff_exp = _expert_width_from_tensors(tensor_shapes) or (n_ff // max(n_expert_used, 1))
    gating, weights_norm = traits.gating, traits.weights_norm
    if arch == "deepseek2":
        gating = Gating(int(get(Keys.LLM.EXPERT_GATING_FUNC, Gating.SOFTMAX.value)) or Gating.SOFTMAX.value)
        weights_norm = bool(get(Keys.LLM.EXPERT_WEIGHTS_NORM, False))
    extra = {}
    for name, template in (
        ("q_lora_rank", Keys.Attention.Q_LORA_RANK),
        ("kv_lora_rank", Keys.Attention.KV_LORA_RANK),
        ("key_length_mla", Keys.Attention.KEY_LENGTH_MLA),
        ("value_length_mla", Keys.Attention.VALUE_LENGTH_MLA),
        ("sliding_window", Keys.Attention.SLIDING_WINDOW),
    ):
        value = get(template)
        if value is not None:
            extra[name] = int(value)
    scale_factor = float(get(Keys.Rope.SCALING_FACTOR, 0.0) or 0.0)
    return ModelConfig(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=int(get(Keys.LLM.CONTEXT_LENGTH, 0)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_rot=int(get(Keys.Rope.DIMENSION_COUNT, head_dim_k)),
        norm_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        rope_freq_base=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
        rope_freq_scale=1.0 / scale_factor if scale_factor else 1.0,
        rope=traits.rope,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff=n_ff,
        n_ff_exp=n_ff_exp,
        n_ff_shexp=int(get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)) or _shared_width_from_tensors(tensor_shapes),
        n_expert_shared=int(get(Keys.LLM.EXPERT_SHARED_COUNT, 0)),
        n_leading_dense=int(get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
        gating=gating,
        weights_norm=weights_norm,
        weights_scale=float(get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0) or 1.0),
        qk_norm=traits.qk_norm,
        extra=extra,
    )


def _expert_width_from_tensors(shapes: dict[str, tuple[int, ...]]) -> int:
    for name, shape in shapes.items():
        if name.endswith("ffn_gate_exps.weight") or name.endswith("ffn_up_exps.weight"):
            return int(shape[1])
        if ".ffn_gate.0." in name or ".ffn_up.0." in name:
            return int(shape[1])
    return 0


def _shared_width_from_tensors(shapes: dict[str, tuple[int, ...]]) -> int:
    """deepseek2 states no shared width: it is n_expert_shared * n_ff_exp, the up_shexp rows."""
    return next((int(shape[1]) for name, shape in shapes.items() if name.endswith("ffn_up_shexp.weight")), 0)


def field_value(field_obj) -> object:
    """Decode a gguf ReaderField into a Python value (str, int, float, bool or list)."""
    types = field_obj.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return None  # string arrays (vocab) are large and read where needed
        return [field_obj.parts[i].tolist()[0] for i in field_obj.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field_obj.parts[field_obj.data[0]]).decode("utf-8", errors="replace")
    value = field_obj.parts[field_obj.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value
