"""Which tensors each architecture has, with GGUF shapes, as llama.cpp's load_arch_tensors expects them.

Shapes are GGUF `ne` order (ne[0] = row length = fan-in of a matmul weight), exactly as written in
src/models/<arch>.cpp; numpy arrays use the reverse order. Shape key: E n_embd, F n_ff_exp, X n_expert,
H n_head, K n_head_kv, D head_dim, V n_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT

from moe_tier.synth.spec import SynthSpec

T = gguf.MODEL_TENSOR

# Roles decide values (writer.py) and whether a tensor may be quantized: as in llama.cpp's
# tensor_allows_quantization, norms, biases, 1-D tensors and the router (ffn_gate_inp) stay F32.
QUANTIZABLE_ROLES = ("embd", "weight")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write. `key`/`part` name the random stream its values come from, so a per-expert
    tensor (Mixtral's legacy layout) holds exactly the slice `part` of the merged tensor `key`."""

    name: str
    ne: tuple[int, ...]
    role: str  # embd | weight | router | norm | bias | sinks
    key: str = ""
    part: int | None = None

    @property
    def quantizable(self) -> bool:
        return self.role in QUANTIZABLE_ROLES and len(self.ne) >= 2


# llama-quant.cpp tensor_type_fallback: a row that does not fill whole 256-blocks gets a 32-block type.
_FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
             QT.IQ4_XS: QT.IQ4_NL}


def stored_qtype(plan: TensorPlan, qtype: QT) -> QT:
    """The type a tensor is stored in when the file's type is `qtype`, following llama.cpp's rules."""
    if not plan.quantizable:
        return QT.F32
    for candidate in (qtype, _FALLBACK.get(qtype)):
        if candidate is not None and plan.ne[0] % gguf.GGML_QUANT_SIZES[candidate][0] == 0:
            return candidate
    return QT.F16


def _name(tensor: T, bid: int | None = None, suffix: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{suffix}"


def plan_tensors(spec: SynthSpec) -> list[TensorPlan]:
    E, V = spec.n_embd, spec.n_vocab
    plans = [TensorPlan(_name(T.TOKEN_EMBD), (E, V), "embd")]
    for bid in range(spec.n_layer):
        plans += _LAYER[spec.arch](spec, bid)
    plans += [TensorPlan(_name(T.OUTPUT_NORM), (E,), "norm"), TensorPlan(_name(T.OUTPUT), (E, V), "weight")]
    return plans


def _norm(tensor: T, bid: int, width: int) -> TensorPlan:
    return TensorPlan(_name(tensor, bid), (width,), "norm")


def _attention(spec: SynthSpec, bid: int, biases: bool = False) -> list[TensorPlan]:
    E, H, K, D = spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim
    plans = [
        _norm(T.ATTN_NORM, bid, E),
        TensorPlan(_name(T.ATTN_Q, bid), (E, H * D), "weight"),
        TensorPlan(_name(T.ATTN_K, bid), (E, K * D), "weight"),
        TensorPlan(_name(T.ATTN_V, bid), (E, K * D), "weight"),
        TensorPlan(_name(T.ATTN_OUT, bid), (H * D, E), "weight"),
    ]
    if biases:
        plans += [TensorPlan(_name(t, bid, "bias"), (w,), "bias")
                  for t, w in ((T.ATTN_Q, H * D), (T.ATTN_K, K * D), (T.ATTN_V, K * D))]
    return plans


def _experts(spec: SynthSpec, bid: int) -> list[TensorPlan]:
    """Router plus routed experts: merged 3-D (E, F, X) tensors, or Mixtral's legacy one-per-expert."""
    E, F, X = spec.n_embd, spec.n_ff_exp, spec.n_expert
    plans = [TensorPlan(_name(T.FFN_GATE_INP, bid), (E, X), "router")]
    merged = ((T.FFN_GATE_EXP, T.FFN_GATE, (E, F)), (T.FFN_DOWN_EXP, T.FFN_DOWN, (F, E)),
              (T.FFN_UP_EXP, T.FFN_UP, (E, F)))
    for exps, single, ne in merged:
        key = _name(exps, bid)
        if spec.layout == "merged":
            plans.append(TensorPlan(key, (*ne, X), "weight", key))
        else:
            plans += [TensorPlan(f"{gguf.TENSOR_NAMES[single].format(bid=bid)}.{x}.weight", ne, "weight", key, x)
                      for x in range(X)]
    return plans


def _ffn(spec: SynthSpec, bid: int, gate: T, up: T, down: T, width: int) -> list[TensorPlan]:
    E = spec.n_embd
    return [TensorPlan(_name(gate, bid), (E, width), "weight"), TensorPlan(_name(up, bid), (E, width), "weight"),
            TensorPlan(_name(down, bid), (width, E), "weight")]


def _llama(spec: SynthSpec, bid: int) -> list[TensorPlan]:
    return _attention(spec, bid) + [_norm(T.FFN_NORM, bid, spec.n_embd)] + _experts(spec, bid)


def _qwen2moe(spec: SynthSpec, bid: int) -> list[TensorPlan]:
    return (_attention(spec, bid, biases=True) + [_norm(T.FFN_NORM, bid, spec.n_embd)] + _experts(spec, bid)
            + [TensorPlan(_name(T.FFN_GATE_INP_SHEXP, bid), (spec.n_embd,), "router")]
            + _ffn(spec, bid, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP, spec.n_ff_shared))


def _qk_normed(q_width: int, k_width: int):
    def layer(spec: SynthSpec, bid: int) -> list[TensorPlan]:
        widths = {"head": spec.head_dim, "embd": spec.n_embd}
        return (_attention(spec, bid) + [_norm(T.ATTN_Q_NORM, bid, widths[q_width]),
                                          _norm(T.ATTN_K_NORM, bid, widths[k_width]),
                                          _norm(T.FFN_NORM, bid, spec.n_embd)] + _experts(spec, bid))
    return layer


def _deepseek2(spec: SynthSpec, bid: int) -> list[TensorPlan]:
    """MLA attention stored split for weight absorption (attn_k_b, attn_v_b), as current converters write it."""
    E, H, D, Dv, R = spec.n_embd, spec.n_head, spec.head_dim, spec.head_dim_v, spec.n_rot
    Lq, Lkv = spec.q_lora_rank, spec.kv_lora_rank
    plans = [
        _norm(T.ATTN_NORM, bid, E),
        _norm(T.ATTN_Q_A_NORM, bid, Lq),
        _norm(T.ATTN_KV_A_NORM, bid, Lkv),
        TensorPlan(_name(T.ATTN_Q_A, bid), (E, Lq), "weight"),
        TensorPlan(_name(T.ATTN_Q_B, bid), (Lq, H * D), "weight"),
        TensorPlan(_name(T.ATTN_KV_A_MQA, bid), (E, Lkv + R), "weight"),
        TensorPlan(_name(T.ATTN_K_B, bid), (D - R, Lkv, H), "weight"),
        TensorPlan(_name(T.ATTN_V_B, bid), (Lkv, Dv, H), "weight"),
        TensorPlan(_name(T.ATTN_OUT, bid), (H * Dv, E), "weight"),
        _norm(T.FFN_NORM, bid, E),
    ]
    if bid < spec.n_leading_dense:
        return plans + _ffn(spec, bid, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, spec.n_ff_dense)
    return (plans + _experts(spec, bid) + [TensorPlan(_name(T.FFN_EXP_PROBS_B, bid, "bias"), (spec.n_expert,), "bias")]
            + _ffn(spec, bid, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP, spec.n_ff_shared))


def _gpt_oss(spec: SynthSpec, bid: int) -> list[TensorPlan]:
    E, F, X = spec.n_embd, spec.n_ff_exp, spec.n_expert
    biases = [TensorPlan(_name(T.ATTN_OUT, bid, "bias"), (E,), "bias"),
              TensorPlan(_name(T.FFN_GATE_INP, bid, "bias"), (X,), "bias"),
              TensorPlan(_name(T.FFN_GATE_EXP, bid, "bias"), (F, X), "bias"),
              TensorPlan(_name(T.FFN_DOWN_EXP, bid, "bias"), (E, X), "bias"),
              TensorPlan(_name(T.FFN_UP_EXP, bid, "bias"), (F, X), "bias")]
    return (_attention(spec, bid, biases=True) + [TensorPlan(_name(T.ATTN_SINKS, bid), (spec.n_head,), "sinks"),
                                                   _norm(T.ATTN_POST_NORM, bid, E)]
            + _experts(spec, bid) + biases)


_LAYER = {
    "llama": _llama,
    "qwen2moe": _qwen2moe,
    "qwen3moe": _qk_normed("head", "head"),
    "olmoe": _qk_normed("embd", "embd"),
    "deepseek2": _deepseek2,
    "gpt-oss": _gpt_oss,
}
