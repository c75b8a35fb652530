"""Export a demo MoE checkpoint (tools/train_demo_moe.py) to a qwen3moe GGUF with its tokenizer (issue 6).

Weights whose rows are a multiple of 32 are stored Q8_0, the router (ffn_gate_inp) and the norms F32, as
llama-quantize leaves them. --check then loads the file with llama-cpp-python and compares its logits on
held-out text of every domain with the PyTorch model run on the dequantized weights, and checks that
llama.cpp tokenizes like the HF tokenizer: the export is faithful only if both agree.

Requirements: torch, numpy, gguf, tokenizers; llama-cpp-python for --check.

    python tools/export_demo_gguf.py --ckpt ckpt/ --tokenizer .carry/demo/tokenizer.json \
        --out data/demo-moe.gguf --check .carry/demo/corpus
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_moe_model import DemoConfig, DemoMoE  # noqa: E402
from demo_tokenizer import END_OF_TEXT, LLAMA_CPP_PRE  # noqa: E402
from train_demo_moe import load_checkpoint  # noqa: E402

ARCH = gguf.MODEL_ARCH.QWEN3MOE
NAME = "moe-tier demo MoE"
LICENSE = "GPL-3.0-or-later"   # compatible with every training source's licence (see data/MODEL_CARD.md)
# The model was trained on plain documents, not dialogue: the template just joins the messages' text.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}"
KEEP_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP,)


def gguf_name(torch_name: str) -> tuple[str, gguf.MODEL_TENSOR]:
    """`blocks.3.ffn_up_exps` -> (`blk.3.ffn_up_exps.weight`, FFN_UP_EXP); checked against the arch's tensors."""
    parts = torch_name.removesuffix(".weight").split(".")
    bid = None
    if parts[0] == "blocks":
        bid, parts = int(parts[1]), parts[2:]
    base = parts[0]
    for kind in gguf.MODEL_TENSORS[ARCH]:
        template = gguf.TENSOR_NAMES[kind]
        if template.format(bid=bid) == (base if bid is None else f"blk.{bid}.{base}"):
            return template.format(bid=bid) + ".weight", kind
    raise ValueError(f"{torch_name}: no {gguf.MODEL_ARCH_NAMES[ARCH]} tensor of that name")


def tensor_type(kind: gguf.MODEL_TENSOR, array: np.ndarray, f32: bool) -> QT:
    block, _ = gguf.GGML_QUANT_SIZES[QT.Q8_0]
    if f32 or array.ndim < 2 or kind in KEEP_F32 or array.shape[-1] % block:
        return QT.F32
    return QT.Q8_0


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_json: Path) -> None:
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    eot = vocab[END_OF_TEXT]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA_CPP_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot)   # documents were trained as <|endoftext|> + text, so BOS is that separator
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_hparams(writer: gguf.GGUFWriter, c: DemoConfig, file_type: gguf.LlamaFileType) -> None:
    writer.add_name(NAME)
    writer.add_license(LICENSE)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_freq_base)
    writer.add_layer_norm_rms_eps(c.rms_eps)
    writer.add_expert_count(c.n_expert)
    writer.add_expert_used_count(c.n_expert_used)
    writer.add_feed_forward_length(c.n_ff_expert)
    writer.add_expert_feed_forward_length(c.n_ff_expert)


def export(config: DemoConfig, state: dict, tokenizer_json: Path, out: Path, f32: bool = False) -> dict:
    """Write the GGUF; return {torch name: the weights as llama.cpp will see them (dequantized)}."""
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[ARCH])
    add_hparams(writer, config, gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    add_tokenizer(writer, tokenizer_json)
    seen = {}
    for torch_name, t in state.items():
        name, kind = gguf_name(torch_name)
        array = t.float().numpy()
        qtype = tensor_type(kind, array, f32)
        data = array if qtype == QT.F32 else gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        seen[torch_name] = array if qtype == QT.F32 else gguf.quants.dequantize(data, qtype).reshape(array.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return seen


def check(gguf_path: Path, config: DemoConfig, weights: dict, tokenizer_json: Path, corpus: Path,
          n_tokens: int = 128) -> dict:
    """llama.cpp vs PyTorch on held-out text of each domain: same token ids, same logits (up to Q8_0 activations)."""
    import llama_cpp
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=config.context_length, logits_all=True, verbose=False, n_threads=2)
    model = DemoMoE(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    report = {}
    for path in sorted(corpus.glob("*.heldout.jsonl")):
        text = json.loads(path.open(encoding="utf-8").readline())[:4000]
        ids_hf = hf.encode(text).ids
        ids_ll = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert llm.detokenize(ids_ll).decode("utf-8") == text, f"{path.stem}: llama.cpp round trip differs"
        ids = [hf.token_to_id(END_OF_TEXT)] + ids_hf[: min(n_tokens, config.context_length) - 1]
        llm.reset()
        llm.eval(ids)
        ll = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        with torch.no_grad():
            pt = model(torch.tensor([ids]))[0][0].double().numpy()
        lp_ll = ll - np.logaddexp.reduce(ll, axis=-1, keepdims=True)
        lp_pt = pt - np.logaddexp.reduce(pt, axis=-1, keepdims=True)
        report[path.stem.split(".")[0]] = {
            "same_ids": ids_hf == ids_ll,
            "rel_err": float(np.linalg.norm(ll - pt) / np.linalg.norm(pt)),
            "max_abs_logprob_diff": float(np.abs(lp_ll - lp_pt).max()),
            "top1_agree": float((ll.argmax(-1) == pt.argmax(-1)).mean()),
        }
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True, help="folder with ckpt.json and its shards")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--f32", action="store_true", help="all tensors F32 (for checking the graph, not for data/)")
    p.add_argument("--check", type=Path, help="corpus folder: compare llama.cpp with PyTorch on held-out text")
    args = p.parse_args()
    config, state, meta = load_checkpoint(args.ckpt)
    weights = export(config, state, args.tokenizer, args.out, args.f32)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), checkpoint step {meta['step']}")
    if args.check:
        for domain, row in check(args.out, config, weights, args.tokenizer, args.check).items():
            print(f"{domain:8} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()))


if __name__ == "__main__":
    main()
