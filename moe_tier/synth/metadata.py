"""The hparam keys each architecture's loader reads (src/models/<arch>.cpp load_arch_hparams), from gguf.Keys."""

from __future__ import annotations

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from moe_tier.synth.spec import SynthSpec
from moe_tier.synth.tokenizer import add_tokenizer

_FILE_TYPE = {
    QT.F32: FT.ALL_F32, QT.F16: FT.MOSTLY_F16, QT.BF16: FT.MOSTLY_BF16, QT.Q8_0: FT.MOSTLY_Q8_0,
    QT.Q4_0: FT.MOSTLY_Q4_0, QT.Q4_1: FT.MOSTLY_Q4_1, QT.Q5_0: FT.MOSTLY_Q5_0, QT.Q5_1: FT.MOSTLY_Q5_1,
    QT.MXFP4: FT.MOSTLY_MXFP4_MOE, QT.Q2_K: FT.MOSTLY_Q2_K, QT.Q3_K: FT.MOSTLY_Q3_K_M, QT.Q4_K: FT.MOSTLY_Q4_K_M,
    QT.Q5_K: FT.MOSTLY_Q5_K_M, QT.Q6_K: FT.MOSTLY_Q6_K, QT.IQ4_XS: FT.MOSTLY_IQ4_XS, QT.IQ4_NL: FT.MOSTLY_IQ4_NL,
}


def file_type(qtype: QT) -> FT:
    return _FILE_TYPE[qtype]


def add_metadata(writer: gguf.GGUFWriter, spec: SynthSpec) -> None:
    """General info, hparams and tokenizer. Keys are written in a fixed order so files are byte-identical."""
    writer.add_name(f"moe-tier synth {spec.arch}")
    writer.add_file_type(file_type(spec.qtype))
    if spec.qtype not in (QT.F32, QT.F16, QT.BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.n_rot)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    # llama (Mixtral) and olmoe size their experts by feed_forward_length; the others have their own key.
    writer.add_feed_forward_length(spec.n_ff_dense if spec.arch == "deepseek2" else spec.n_ff_exp)
    if spec.arch in ("qwen2moe", "qwen3moe", "deepseek2", "gpt-oss"):
        writer.add_expert_feed_forward_length(spec.n_ff_exp)
    if spec.arch == "deepseek2":
        _add_deepseek2(writer, spec)
    else:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim_v)
    if spec.arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(spec.n_ff_shared)
    if spec.arch == "gpt-oss":
        writer.add_sliding_window(spec.sliding_window)
    add_tokenizer(writer, spec.n_vocab)


def _add_deepseek2(writer: gguf.GGUFWriter, spec: SynthSpec) -> None:
    """MLA as current converters store it: MQA with key = kv_lora_rank + rope dims, value = kv_lora_rank;
    the decompressed head sizes go to the *_mla keys. DeepSeek-V3 routing: sigmoid, normalised, scaled."""
    writer.add_leading_dense_block_count(spec.n_leading_dense)
    writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    writer.add_key_length(spec.kv_lora_rank + spec.n_rot)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.head_dim)
    writer.add_value_length_mla(spec.head_dim_v)
    writer.add_expert_shared_count(spec.n_expert_shared)
    writer.add_expert_weights_scale(2.5)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
