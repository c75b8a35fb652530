"""Train the demo model's byte-level BPE tokenizer and tokenize the corpus (issue 6).

The pre-tokenizer is Qwen2's regex, so that llama.cpp with `tokenizer.ggml.pre = "qwen2"` splits text exactly
as this tokenizer does (see src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2). Documents are written as
[<|endoftext|>, tokens...] so that the model sees the separator llama.cpp prepends as BOS.

Requirements: tokenizers, numpy.

    python tools/demo_tokenizer.py --corpus .carry/demo/corpus --out .carry/demo

Writes <out>/tokenizer.json, <out>/tokens/<domain>.<split>.npy (uint16) and <out>/tokens/counts.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192
MAX_TOKEN_BYTES = 16          # llama-cpp-python's detokenize drops pieces longer than its 32-byte buffer
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT,)
# Qwen2's pre-tokenizer regex as its tokenizer.json writes it; llama.cpp spells the (?i:) group out.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_PRE = "qwen2"


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def train(corpus: Path) -> Tokenizer:
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  max_token_length=MAX_TOKEN_BYTES)
    train_files = sorted(corpus.glob("*.train.jsonl"))
    tok.train_from_iterator((doc for path in train_files for doc in documents(path)), trainer=trainer)
    return tok


def encode_file(tok: Tokenizer, path: Path) -> np.ndarray:
    eot = tok.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    docs = list(documents(path))
    for enc in tok.encode_batch(docs):
        ids.append(eot)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tok = train(args.corpus)
    assert tok.get_vocab_size() <= np.iinfo(np.uint16).max
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    tokens = args.out / "tokens"
    tokens.mkdir(exist_ok=True)
    counts = {}
    for path in sorted(args.corpus.glob("*.jsonl")):
        ids = encode_file(tok, path)
        np.save(tokens / f"{path.stem}.npy", ids)
        chars = path.stat().st_size
        counts[path.stem] = int(ids.size)
        print(f"{path.stem:18} {ids.size:10,d} tokens  ({chars / ids.size:.2f} bytes of JSON per token)")
    (tokens / "counts.json").write_text(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
