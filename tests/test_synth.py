"""Synthetic GGUF MoE models: llama.cpp loads every architecture and type, files are deterministic,
the tokenizer round-trips, the fast full-size writer produces loadable files of the planned size."""

from __future__ import annotations

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from cli.main import main
from moe_tier.errors import MoeTierError
from moe_tier.synth import ARCHS, SynthSpec, mixtral_8x7b, tiny, write_model
from moe_tier.synth.fast import block_pool, write_fast
from moe_tier.synth.tensors import plan_tensors, stored_qtype
from moe_tier.synth.writer import tensor_nbytes

PROMPT = b"The quick brown fox jumps over the lazy dog, then 12 more words follow here."
CORE_QTYPES = ("F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K")
OTHER_QTYPES = ("F16", "BF16", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "Q2_K", "Q3_K", "Q5_K", "IQ4_XS", "IQ4_NL")


def llama_logits(path, text: bytes = PROMPT) -> np.ndarray:
    """(tokens, vocab) logits from llama.cpp for every position of `text`."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(text)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def assert_sane(logits: np.ndarray) -> None:
    assert np.isfinite(logits).all()
    assert (logits.std(axis=1) > 0.1).all(), "logits flat across the vocabulary"
    assert np.abs(logits).max() < 100, "logits huge"
    assert not np.allclose(logits[1], logits[-1]), "logits do not depend on the input"


def assert_tensors_as_planned(path, spec: SynthSpec) -> None:
    """Names, GGUF shapes and stored types match the plan (the type rules mirror llama-quant.cpp)."""
    plans = {p.name: p for p in plan_tensors(spec)}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(tensors) == set(plans)
    for name, t in tensors.items():
        assert tuple(int(n) for n in t.shape) == plans[name].ne, name
        assert t.tensor_type == stored_qtype(plans[name], spec.qtype), name


@pytest.mark.parametrize("qtype", CORE_QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_every_arch(synth_model, arch, qtype):
    path = synth_model(arch, qtype)
    assert_tensors_as_planned(path, tiny(arch, qtype=qtype))
    assert_sane(llama_logits(path))


@pytest.mark.parametrize("qtype", OTHER_QTYPES)
def test_llama_cpp_runs_other_qtypes(synth_model, qtype):
    path = synth_model("llama", qtype)
    assert_tensors_as_planned(path, tiny("llama", qtype=qtype))
    assert_sane(llama_logits(path))


def test_deepseek2_narrow_rows_fall_back_like_llama_cpp(synth_model):
    """attn_k_b rows are 64 wide, too short for a 256-block: llama.cpp stores them Q5_0 in a Q4_K file."""
    tensors = {t.name: t for t in gguf.GGUFReader(synth_model("deepseek2", "Q4_K")).tensors}
    assert tensors["blk.1.attn_k_b.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_0
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_per_expert_layout_holds_the_merged_slices(synth_model):
    merged = {t.name: t for t in gguf.GGUFReader(synth_model("llama")).tensors}
    split = {t.name: t for t in gguf.GGUFReader(synth_model("llama", layout="per-expert")).tensors}
    spec = tiny("llama")
    assert not any("exps" in name for name in split)
    for bid in range(spec.n_layer):
        for kind in ("gate", "down", "up"):
            stacked = merged[f"blk.{bid}.ffn_{kind}_exps.weight"].data
            for x in range(spec.n_expert):
                np.testing.assert_array_equal(split[f"blk.{bid}.ffn_{kind}.{x}.weight"].data, stacked[x])


@pytest.mark.parametrize("qtype", ["F32", "Q4_K"])
def test_llama_cpp_rejects_per_expert_layout(synth_model, qtype):
    # Current llama.cpp no longer reads Mixtral's one-tensor-per-expert layout: src/models/llama.cpp
    # load_arch_tensors requires blk.N.ffn_down_exps.weight (flag 0), and the per-expert names
    # LLM_TENSOR_FFN_{GATE,DOWN,UP}_EXP (llama-arch.cpp "blk.%d.ffn_gate.%d") are used by no loader.
    # The file is still written because such files exist and moe-tier's reader must handle them.
    path = synth_model("llama", qtype, layout="per-expert")
    assert_tensors_as_planned(path, tiny("llama", qtype=qtype, layout="per-expert"))
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_threads=2)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_same_spec_same_bytes(tmp_path, qtype):
    spec = tiny("qwen3moe", qtype=qtype)
    first = write_model(tmp_path / "a.gguf", spec).read_bytes()
    assert write_model(tmp_path / "b.gguf", spec).read_bytes() == first
    assert write_model(tmp_path / "c.gguf", spec.replace(seed=1)).read_bytes() != first


def test_tokenizer_round_trips_and_matches_embedding(synth_model):
    path = synth_model("qwen3moe")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    rows = {t.name: t for t in gguf.GGUFReader(path).tensors}["token_embd.weight"].shape[1]
    assert llm.n_vocab() == tiny("qwen3moe").n_vocab == rows
    for text in (b"Hello world", b"  two leading spaces", b"x=1; y=[2,3]!\n\ttab", bytes(range(32, 127)),
                 b"trailing ", "caf\u00e9 \u2603".encode()):
        tokens = llm.tokenize(text)
        assert tokens[0] == llm.token_bos()
        assert llm.detokenize(tokens) == text
    assert len(llm.tokenize(b"the", add_bos=False)) < len(b" the"), "the SPM merger builds pieces (here '\u2581t')"


def test_chat_template_renders(synth_model):
    llm = llama_cpp.Llama(str(synth_model("llama")), n_ctx=64, verbose=False, n_threads=2)
    template = llm.metadata["tokenizer.chat_template"]
    prompt = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(
        messages=[{"role": "user", "content": "hi"}]).prompt
    assert prompt == "<s>user: hi\nassistant:"
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert reply["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_is_decided_clearly(synth_model, arch):
    """On unit-RMS inputs the k-th and (k+1)-th router logits are well apart and every expert gets picked."""
    spec = tiny(arch)
    router = next(t for t in gguf.GGUFReader(synth_model(arch)).tensors if t.name.endswith("ffn_gate_inp.weight"))
    x = np.random.default_rng(0).standard_normal((256, spec.n_embd)).astype(np.float32)
    logits = x @ np.asarray(router.data).T  # (tokens, n_expert)
    ranked = np.sort(logits, axis=1)[:, ::-1]
    gap = ranked[:, spec.n_expert_used - 1] - ranked[:, spec.n_expert_used]
    assert np.median(gap) > 0.1
    chosen = np.argsort(-logits, axis=1)[:, : spec.n_expert_used]
    assert set(np.unique(chosen)) == set(range(spec.n_expert))


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q8_0"])
def test_block_pool_dequantizes_to_the_target_spread(qtype):
    """gguf's dequantizer (the reference) sees finite values with mean ~0 and the requested std."""
    qt = gguf.GGMLQuantizationType[qtype]
    pool = block_pool(qt, 0.02, seed=0, nbytes=1 << 18)
    values = gguf.quants.dequantize(pool.reshape(-1, gguf.GGML_QUANT_SIZES[qt][1]), qt)
    assert np.isfinite(values).all()
    assert abs(values.mean()) < 0.002
    assert 0.015 < values.std() < 0.025


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_K"), ("llama", "Q6_K"), ("qwen3moe", "Q2_K"),
                                        ("deepseek2", "Q4_K"), ("gpt-oss", "IQ4_XS"), ("olmoe", "Q8_0")])
def test_fast_mode_file_loads_with_planned_size(tmp_path, arch, qtype):
    spec = tiny(arch, qtype=qtype)
    path = write_fast(tmp_path / "fast.gguf", spec, pool_bytes=1 << 16)
    reader = gguf.GGUFReader(path)
    planned = sum(gguf.GGUFWriter.ggml_pad(tensor_nbytes(p, stored_qtype(p, spec.qtype)), reader.alignment)
                  for p in plan_tensors(spec))
    assert path.stat().st_size == reader.data_offset + planned
    assert_tensors_as_planned(path, spec)
    assert_sane(llama_logits(path))
    assert write_fast(tmp_path / "again.gguf", spec, pool_bytes=1 << 16).read_bytes() == path.read_bytes()


def test_cli_writes_reduced_mixtral_preset_fast(tmp_path, capsys):
    out = tmp_path / "mixtral.gguf"
    argv = ["synth", str(out), "--preset", "mixtral-8x7b", "--fast", "--layers", "2", "--embd", "256", "--ff", "512",
            "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--vocab", "1000"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and " llama Q4_K " in line and "\n" not in line
    spec = mixtral_8x7b(n_layer=2, n_embd=256, n_ff_exp=512, n_head=4, n_head_kv=2, head_dim=64, n_vocab=1000)
    assert_tensors_as_planned(out, spec)
    assert_sane(llama_logits(out))


@pytest.mark.parametrize("argv", [
    ["--arch", "qwen3moe", "--experts", "0"],
    ["--qtype", "Q9_9"],
    ["--arch", "qwen3moe", "--layout", "per-expert"],
    ["--arch", "qwen3moe", "--preset", "mixtral-8x7b"],
    ["--embd", "100"],
    ["--used", "9"],
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv):
    assert main(["synth", str(tmp_path / "bad.gguf"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-tier: ") and "\n" not in err
    assert not (tmp_path / "bad.gguf").exists()


def test_spec_rejects_impossible_shapes():
    with pytest.raises(MoeTierError, match="n_head_kv"):
        tiny("olmoe", n_head_kv=2)
    with pytest.raises(MoeTierError, match="unknown arch"):
        tiny("mamba")
    with pytest.raises(MoeTierError, match="leading dense"):
        tiny("llama", n_leading_dense=1)
