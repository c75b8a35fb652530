"""Build a trace while an engine runs: the engine calls `record` once per MoE layer per forward pass.

Shape key: T tokens in one forward pass, K experts per token.
The recorder is the seam between engines and traces: moe-tier's engine passes it as its routing observer,
the llama.cpp profiler feeds it from the eval callback. A forward pass ends when a layer repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router_predict.trace import Trace


class TraceRecorder:
    def __init__(self, *, fingerprint: str, arch: str, n_layer: int, n_expert: int, n_expert_used: int,
                 moe_layers: Sequence[int], engine: str):
        self.meta = dict(fingerprint=fingerprint, arch=arch, n_layer=n_layer, n_expert=n_expert,
                         n_expert_used=n_expert_used, engine=engine)
        self.moe_layers = np.asarray(moe_layers, dtype=np.int32)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (T, L, K) ids, weights, (T,) seq
        self._prompts: list[list[int]] = []
        self._generated: list[list[int]] = []
        self._position = 0

    def begin_sequence(self, prompt_tokens: Sequence[int]) -> None:
        """A new prompt; the rows recorded from now on are its tokens, prompt first, in order."""
        self._flush()
        self._prompts.append([int(t) for t in prompt_tokens])
        self._generated.append([])
        self._position = 0

    def record(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        """expert_ids (T, K) int, weights (T, K) float: one MoE layer of one forward pass."""
        if layer in self._pending:
            self._flush()
        self._pending[int(layer)] = (np.asarray(expert_ids).copy(), np.asarray(weights, dtype=np.float32).copy())

    def generated(self, token: int) -> None:
        """The id of the next generated token (it is fed back in the next forward pass)."""
        self._generated[-1].append(int(token))

    def _flush(self) -> None:
        if not self._pending:
            return
        if not self._prompts:
            raise RuntimeError("record() before begin_sequence()")
        missing = set(self.moe_layers.tolist()) - set(self._pending)
        if missing:
            raise RuntimeError(f"forward pass without routing for MoE layers {sorted(missing)}")
        ids = np.stack([self._pending[int(l)][0] for l in self.moe_layers], axis=1)  # (T, L, K)
        w = np.stack([self._pending[int(l)][1] for l in self.moe_layers], axis=1)
        positions = self._position + np.arange(ids.shape[0], dtype=np.int32)
        self._rows.append((ids, w, np.full(ids.shape[0], len(self._prompts) - 1, np.int32), positions))
        self._position += ids.shape[0]
        self._pending = {}

    def trace(self) -> Trace:
        self._flush()
        K = self.meta["n_expert_used"]
        ids = np.concatenate([r[0] for r in self._rows]) if self._rows else np.zeros((0, len(self.moe_layers), K))
        w = np.concatenate([r[1] for r in self._rows]) if self._rows else np.zeros(ids.shape)
        seq = np.concatenate([r[2] for r in self._rows]) if self._rows else np.zeros(0)
        pos = np.concatenate([r[3] for r in self._rows]) if self._rows else np.zeros(0)
        n_prompt = np.array([len(p) for p in self._prompts], dtype=np.int64)
        is_prompt = pos < n_prompt[seq.astype(int)] if len(seq) else np.zeros(0, bool)
        tokens = [p + g for p, g in zip(self._prompts, self._generated)]
        token = np.array([tokens[s][p] if p < len(tokens[s]) else -1 for s, p in zip(seq.astype(int), pos)],
                         dtype=np.int32)
        return Trace(moe_layers=self.moe_layers, expert_ids=ids.astype(np.int16), weights=w.astype(np.float32),
                     is_prompt=is_prompt, sequence=seq.astype(np.int32), position=pos.astype(np.int32),
                     token=token, **self.meta)
