"""The reader's catalog and expert byte ranges, on synthetic files of every architecture, layout and type."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from moe_tier.errors import MoeTierError
from moe_tier.reader import Category, ExpertId, classify, open_model
from moe_tier.synth import ARCHS, tiny

CASES = [(arch, "merged", q) for arch in ARCHS for q in ("F32", "Q8_0", "Q4_K")] + [
    ("llama", "per-expert", q) for q in ("F32", "Q8_0", "Q4_K")
]


@pytest.mark.parametrize("arch,layout,qtype", CASES)
def test_expert_byte_ranges_equal_tensor_slices(synth_model, arch, layout, qtype):
    path = synth_model(arch, qtype=qtype, layout=layout)
    desc = open_model(path)
    spec = tiny(arch, qtype=qtype, layout=layout)
    full = {t.name: t for t in GGUFReader(path).tensors}
    assert desc.arch == arch
    assert len(desc.experts) == spec.n_expert * (spec.n_layer - spec.n_leading_dense)
    for eid, ref in desc.experts.items():
        for part in ref.parts:
            got = desc.expert_data(eid, part.matrix)
            tensor = full[part.tensor]
            want = np.asarray(tensor.data).view(np.uint8).reshape(-1)
            if tensor.name.endswith("_exps.weight") or tensor.name.endswith("_exps.bias"):
                per_expert = tensor.n_bytes // int(tensor.shape[-1])
                want = want[eid.expert * per_expert : (eid.expert + 1) * per_expert]
            np.testing.assert_array_equal(got, want)
            assert part.qtype == tensor.tensor_type


@pytest.mark.parametrize("arch,layout,qtype", CASES)
def test_category_totals_add_up_to_tensor_data(synth_model, arch, layout, qtype):
    path = synth_model(arch, qtype=qtype, layout=layout)
    desc = open_model(path)
    reader = GGUFReader(path)
    totals = desc.bytes_by_category()
    assert sum(totals.values()) == sum(int(t.n_bytes) for t in reader.tensors)
    assert totals["routed"] == sum(e.n_bytes for e in desc.experts.values())
    assert totals["router"] > 0 and totals["dense"] > 0
    data_section = path.stat().st_size - reader.data_offset
    assert 0 <= data_section - sum(totals.values()) < 32 * len(reader.tensors)  # only alignment padding


def test_layouts_describe_the_same_experts(synth_model):
    merged = open_model(synth_model("llama", qtype="Q8_0"))
    legacy = open_model(synth_model("llama", qtype="Q8_0", layout="per-expert"))
    assert merged.experts.keys() == legacy.experts.keys()
    for eid in merged.experts:
        for m in ("gate", "up", "down"):
            np.testing.assert_array_equal(merged.expert_data(eid, m), legacy.expert_data(eid, m))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_metadata(synth_model, arch):
    spec = tiny(arch)
    c = open_model(synth_model(arch)).config
    assert (c.n_layer, c.n_embd, c.n_expert, c.n_expert_used) == (spec.n_layer, spec.n_embd, spec.n_expert,
                                                                   spec.n_expert_used)
    assert (c.n_head, c.n_head_kv, c.n_vocab, c.n_ff_exp) == (spec.n_head, spec.n_head_kv, spec.n_vocab, spec.n_ff_exp)
    assert c.n_leading_dense == spec.n_leading_dense
    assert c.n_ff_shexp == spec.n_ff_shared


def test_shared_and_router_tensors_are_classified():
    assert classify("blk.3.ffn_gate_inp.weight") is Category.ROUTER
    assert classify("blk.3.exp_probs_b.bias") is Category.ROUTER
    assert classify("blk.3.ffn_gate_inp_shexp.weight") is Category.SHARED
    assert classify("blk.3.ffn_up_shexp.weight") is Category.SHARED
    assert classify("blk.3.ffn_down_exps.weight") is Category.ROUTED
    assert classify("blk.3.ffn_down.5.weight") is Category.ROUTED
    assert classify("blk.3.ffn_down.weight") is Category.DENSE  # a leading dense layer
    assert classify("token_embd.weight") is Category.DENSE


def test_fingerprint_is_stable_and_tells_models_apart(synth_model):
    a = open_model(synth_model("llama", qtype="Q8_0"))
    assert a.fingerprint == open_model(a.path).fingerprint
    assert a.fingerprint != open_model(synth_model("llama", qtype="Q8_0", seed=1)).fingerprint


def _dense_gguf(path):
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_bad_inputs_name_the_file_and_the_problem(synth_model, tmp_path):
    good = synth_model("llama")
    cases = {
        tmp_path / "missing.gguf": "no such file",
        tmp_path / "text.gguf": "not a GGUF file",
        tmp_path / "cut.gguf": "truncated",
        tmp_path / "cut-header.gguf": "truncated",
        _dense_gguf(tmp_path / "dense.gguf"): "not a mixture-of-experts model",
    }
    (tmp_path / "text.gguf").write_text("hello")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    (tmp_path / "cut-header.gguf").write_bytes(data[:200])
    for path, problem in cases.items():
        with pytest.raises(MoeTierError) as err:
            open_model(path)
        assert str(path) in str(err.value) and problem in str(err.value)
        assert "\n" not in str(err.value)


def test_unknown_architecture(tmp_path):
    w = GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(MoeTierError, match="unsupported architecture 'mamba'"):
        open_model(tmp_path / "x.gguf")


def test_expert_ids_are_value_types():
    assert ExpertId(1, 2) == (1, 2) and ExpertId(1, 2).layer == 1
