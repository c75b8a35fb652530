"""Tokenizer: llama.cpp's own, loaded with vocab_only from the same GGUF, so ids match the reference."""

from __future__ import annotations

import codecs
from pathlib import Path

from moe_tier.errors import MoeTierError


class Tokenizer:
    def __init__(self, path: str | Path):
        import llama_cpp
        from llama_cpp._internals import LlamaModel  # the vocabulary alone: no context, no weights

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as err:
            raise MoeTierError(path, f"llama.cpp cannot load its vocabulary: {err}") from None
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.bos = self._model.token_bos()
        self.eos = self._model.token_eos()
        self.n_vocab = self._model.n_vocab()
        self.chat_template = self._model.metadata().get("tokenizer.chat_template")
        self.path = path

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Adds BOS only where the GGUF asks for it (tokenizer.ggml.add_bos_token)."""
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def decode(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        return self._model.detokenize([token])

    def is_end(self, token: int) -> bool:
        return bool(self._is_eog(self._model.vocab, token))

    def apply_chat(self, user_text: str) -> str:
        """The prompt as the GGUF's chat template renders it (BOS included as text: encode without specials)."""
        if not self.chat_template:
            raise MoeTierError(self.path, "--chat given but the GGUF has no tokenizer.chat_template")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = self._model.detokenize([self.bos], special=True).decode("utf-8", errors="replace")
        eos = self._model.detokenize([self.eos], special=True).decode("utf-8", errors="replace")
        formatter = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos)
        return formatter(messages=[{"role": "user", "content": user_text}]).prompt


class TextStream:
    """Turns generated tokens into text as it becomes valid UTF-8 (a character may span tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.piece(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
