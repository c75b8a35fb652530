"""The embedded demo model data/demo-moe.gguf: its keys and tensors as data/MODEL_CARD.md documents them,
its tokenizer in llama.cpp, and greedy text that is not degenerate."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import Keys

llama_cpp = pytest.importorskip("llama_cpp")

MODEL = Path(__file__).resolve().parents[1] / "data" / "demo-moe.gguf"
MAX_FILE_BYTES = 40 * 10**6
ARCH = "qwen3moe"
HPARAMS = {  # as data/MODEL_CARD.md lists them
    Keys.LLM.BLOCK_COUNT: 6, Keys.LLM.EMBEDDING_LENGTH: 384, Keys.LLM.CONTEXT_LENGTH: 512,
    Keys.Attention.HEAD_COUNT: 6, Keys.Attention.HEAD_COUNT_KV: 2, Keys.Attention.KEY_LENGTH: 64,
    Keys.Attention.VALUE_LENGTH: 64, Keys.LLM.EXPERT_COUNT: 8, Keys.LLM.EXPERT_USED_COUNT: 2,
    Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: 256, Keys.LLM.VOCAB_SIZE: 8192,
}
# One sample per training domain (not taken from the corpus), with the bytes per token the tokenizer must
# at least reach on it: a sign that its merges were learnt on that domain.
SAMPLES = {
    "python": ("def parse(path, *, strict=True):\n    with open(path, encoding='utf-8') as f:\n"
               "        return [line.rstrip() for line in f if line.strip()]\n", 2.5),
    "english": ("And it came to pass, when the king heard these words, that he sent unto all the people "
                "of the land.", 3.0),
    "german": ("Die Datei wird nur dann überschrieben, wenn der Benutzer die nötigen Rechte besitzt.", 3.0),
    "french": ("Le paquet doit être installé avant que le service puisse démarrer correctement.", 3.0),
    "rst": (".. function:: open(file, mode='r')\n\n   Open *file* and return a corresponding "
            ":term:`file object`.\n", 2.5),
}
PROMPTS = ("And the LORD said unto Moses,", "import os\n\ndef ", "Die Konfiguration des Netzwerks",
           "Le système Debian")


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(MODEL)


@pytest.fixture(scope="module")
def vocab():
    return llama_cpp.Llama(str(MODEL), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def llm():
    return llama_cpp.Llama(str(MODEL), n_ctx=256, verbose=False, n_threads=2, seed=0)


def value(reader, key: str):
    field = reader.get_field(key.format(arch=ARCH))
    assert field is not None, f"{key} missing"
    return field.contents()


def test_file_fits_the_size_budget():
    assert MODEL.stat().st_size <= MAX_FILE_BYTES


def test_hparams_are_as_documented(reader):
    assert value(reader, Keys.General.ARCHITECTURE) == ARCH
    for key, expected in HPARAMS.items():
        assert value(reader, key) == expected, key
    assert value(reader, Keys.Tokenizer.MODEL) == "gpt2"
    assert value(reader, Keys.Tokenizer.PRE) == "qwen2"
    tokens = value(reader, Keys.Tokenizer.LIST)
    assert len(tokens) == HPARAMS[Keys.LLM.VOCAB_SIZE]
    bos, eos = value(reader, Keys.Tokenizer.BOS_ID), value(reader, Keys.Tokenizer.EOS_ID)
    assert bos == eos and tokens[bos] == "<|endoftext|>"
    assert "messages" in value(reader, Keys.Tokenizer.CHAT_TEMPLATE)


def test_tensor_types(reader):
    """Routers and norms F32 (as llama-quantize leaves them), every other weight Q8_0; output untied."""
    types = {t.name: t.tensor_type for t in reader.tensors}
    n_layer = HPARAMS[Keys.LLM.BLOCK_COUNT]
    assert len(types) == 3 + 12 * n_layer
    for name, qtype in types.items():
        expected = QT.F32 if name.endswith(("norm.weight", "ffn_gate_inp.weight")) else QT.Q8_0
        assert qtype == expected, name
    experts = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert tuple(int(n) for n in experts.shape) == (384, 256, 8)   # ggml order: n_embd, n_ff_exp, n_expert
    assert "output.weight" in types


@pytest.mark.parametrize("domain", list(SAMPLES))
def test_tokenizer_round_trip_and_compression(vocab, domain):
    text, min_bytes_per_token = SAMPLES[domain]
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=False)
    assert vocab.detokenize(ids).decode("utf-8") == text
    assert len(text.encode("utf-8")) / len(ids) >= min_bytes_per_token


def test_tokens_fit_llama_cpp_python_piece_buffer(vocab):
    """llama-cpp-python detokenizes through a 32-byte buffer and drops longer pieces."""
    longest = max(len(vocab._model.token_to_piece(i, special=True).rstrip(b"\0")) for i in range(vocab.n_vocab()))
    assert longest <= 16


def test_bos_is_prepended(vocab):
    ids = vocab.tokenize(b"hello", add_bos=True)
    assert ids[0] == vocab.token_bos() == vocab.token_eos()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_is_not_degenerate(llm, prompt):
    """A trained model continues each domain with varied tokens; random or collapsed weights repeat one."""
    ids = llm.tokenize(prompt.encode("utf-8"))
    out = []
    llm.reset()
    for token in llm.generate(ids, top_k=1, temp=0.0):
        out.append(token)
        if len(out) == 32 or token == llm.token_eos():
            break
    assert len(out) == 32
    assert len(set(out)) >= 12
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    assert sum(ch.isalpha() for ch in text) > len(text) / 3


def test_prediction_beats_chance():
    """Mean next-token loss on a fresh English sentence far below uniform (ln 8192 = 9.0)."""
    llm = llama_cpp.Llama(str(MODEL), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    text = "And the king said unto his servants, Go ye and build the house of the LORD in Jerusalem."
    ids = llm.tokenize(text.encode("utf-8"))
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    loss = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert loss < 4.5


@pytest.mark.parametrize("prompt", ["def read_config(path):", "And the LORD said unto Moses,"])
def test_moe_tier_greedy_text_equals_llama_cpp(prompt):
    """The embedded default model: moe-tier's engine and llama.cpp produce the same greedy tokens."""
    from moe_tier.engine import Engine
    from test_engine_parity import assert_greedy_matches

    eng = Engine.open(MODEL, ctx=64)
    same = assert_greedy_matches(eng, MODEL, eng.tokenize(prompt), 24, 0.15)
    assert len(same) == 24
