"""A real, minimal SentencePiece-style vocabulary that llama.cpp loads (`tokenizer.ggml.model = "llama"`).

Ids: 0 <unk>, 1 <s>, 2 </s>, then 256 byte-fallback tokens <0x00>..<0xFF> (so any text tokenizes and
detokenizes exactly), then word pieces. Pieces are closed under prefixes ("▁th" comes after "▁t"), so the
SPM bigram merger of llama.cpp can always build every piece from single characters.
"""

from __future__ import annotations

import itertools
import string
from typing import Iterator

import gguf

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPACE = "\u2581"  # SentencePiece's visible space
_SPECIALS = ("<unk>", "<s>", "</s>")
_N_BYTES = 256
MIN_VOCAB = len(_SPECIALS) + _N_BYTES + 1

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _pieces() -> Iterator[str]:
    """Deterministic, unbounded, prefix-closed word pieces: short common ones first."""
    yield SPACE
    printable = [c for c in string.printable if not c.isspace()]
    yield from printable
    yield from (SPACE + c for c in printable)
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield word
            yield SPACE + word


def vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, SPM scores (higher merges first) and gguf token types for a vocabulary of n_vocab entries."""
    T = gguf.TokenType
    tokens = list(_SPECIALS) + [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * _N_BYTES
    tokens += itertools.islice(_pieces(), n_vocab - len(tokens))
    types += [T.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * (len(_SPECIALS) + _N_BYTES) + [-float(i) for i in range(n_vocab - len(_SPECIALS) - _N_BYTES)]
    return tokens, scores, [int(t) for t in types]


def add_tokenizer(writer: gguf.GGUFWriter, n_vocab: int) -> None:
    tokens, scores, types = vocab(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
