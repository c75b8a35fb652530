"""The real Mixtral-8x7B routing (../shared/data/routing, evaluation use only) as traces, and its expert sizes.

The JSONL is read in place and never copied into the project. Mixtral-8x7B in GGUF is architecture `llama`
with 32 layers of 8 experts (top-2); a Q4_K expert is three 4096 x 14336 matrices.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from router_predict.jsonl import read_jsonl
from router_predict.trace import Trace

ROUTING = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "routing"
JSONL = ROUTING / "mixtral-8x7b-instruct-gsm8k.jsonl"
N_LAYER, N_EXPERT, D_MODEL, D_FF, D_KV = 32, 8, 4096, 14336, 1024
QTYPE = gguf.GGMLQuantizationType.Q4_K


def q_bytes(n_elements: int, qtype: gguf.GGMLQuantizationType = QTYPE) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n_elements // block * size


EXPERT_BYTES = q_bytes(3 * D_MODEL * D_FF)
DENSE_LAYER_BYTES = q_bytes(2 * D_MODEL * D_MODEL + 2 * D_MODEL * D_KV) + 4 * D_MODEL * N_EXPERT


def load() -> Trace:
    """Both GSM8K problems as one trace, one sequence each (incomplete final tokens dropped)."""
    trace, _ = read_jsonl(JSONL, n_expert=N_EXPERT, fingerprint="mixtral-8x7b-instruct", arch="llama",
                          n_layer=N_LAYER)
    return trace


def folds(trace: Trace) -> list[tuple[str, Trace, Trace]]:
    """Two held-out folds: fit on one problem, score on the other."""
    a, b = trace.sequences()[:2]
    fa, fb = trace.select(trace.sequence == a), trace.select(trace.sequence == b)
    return [(f"fit {a} / score {b}", fa, fb), (f"fit {b} / score {a}", fb, fa)]


def expert_bytes(trace: Trace) -> np.ndarray:
    return np.full(trace.n_moe_layers * trace.n_expert, EXPERT_BYTES, np.int64)
