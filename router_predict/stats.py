"""Summaries of a trace: how skewed each layer's routing is, how soon experts come back, and how layers co-vary.

Shape key: N tokens, L MoE layers, K experts per token, E experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router_predict.trace import Trace


@dataclass(frozen=True)
class LayerStats:
    frequency: np.ndarray  # (L, E) share of a layer's selections that went to each expert (rows sum to 1)
    entropy_bits: np.ndarray  # (L,) entropy of `frequency`; log2(E) is uniform routing
    reuse_distance: np.ndarray  # (L,) mean tokens since the same expert was last chosen at that layer
    reuse_next: np.ndarray  # (L,) share of a token's experts that the previous token also chose
    cooccurrence: np.ndarray  # (L-1, E, E) P(expert j at layer l+1 | expert i at layer l), over chosen pairs
    transition_top1: np.ndarray  # (L-1,) mean over i of max_j cooccurrence: how predictable the next layer is


def counts(trace: Trace) -> np.ndarray:
    """(L, E) how often each expert was chosen."""
    flat = trace.flat_ids().reshape(-1)
    return np.bincount(flat, minlength=trace.n_moe_layers * trace.n_expert).reshape(trace.n_moe_layers, -1)


def reuse_distances(trace: Trace) -> np.ndarray:
    """(L,) mean over selections of the tokens since that expert's previous selection in the same sequence."""
    L, E = trace.n_moe_layers, trace.n_expert
    total, seen = np.zeros(L), np.zeros(L)
    for seq in trace.sequences():
        ids = trace.expert_ids[trace.sequence == seq]  # (n, L, K)
        last = np.full((L, E), -1)
        for t in range(ids.shape[0]):
            for l in range(L):
                for e in ids[t, l]:
                    if last[l, e] >= 0:
                        total[l] += t - last[l, e]
                        seen[l] += 1
                    last[l, e] = t
    return np.divide(total, seen, out=np.full(L, np.nan), where=seen > 0)


def reuse_next(trace: Trace) -> np.ndarray:
    """(L,) share of token t's experts already chosen by token t-1 of the same sequence."""
    ids = trace.expert_ids
    same_seq = trace.sequence[1:] == trace.sequence[:-1]
    prev, cur = ids[:-1][same_seq], ids[1:][same_seq]  # (n, L, K)
    hits = (cur[..., :, None] == prev[..., None, :]).any(-1)  # (n, L, K)
    return hits.mean(axis=(0, 2)) if hits.size else np.full(trace.n_moe_layers, np.nan)


def cooccurrence(trace: Trace, distance: int = 1) -> np.ndarray:
    """(L-d, E, E) P(expert j chosen at layer l+d | expert i chosen at layer l), rows of unseen i uniform."""
    L, E = trace.n_moe_layers, trace.n_expert
    out = np.zeros((max(L - distance, 0), E, E))
    for l in range(L - distance):
        a, b = trace.expert_ids[:, l, :], trace.expert_ids[:, l + distance, :]
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                np.add.at(out[l], (a[:, i], b[:, j]), 1.0)
    rows = out.sum(-1, keepdims=True)
    return np.divide(out, rows, out=np.full_like(out, 1.0 / E), where=rows > 0)


def layer_stats(trace: Trace) -> LayerStats:
    c = counts(trace).astype(np.float64)
    freq = c / np.maximum(c.sum(-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(freq > 0, freq * np.log2(freq), 0.0), axis=-1)
    co = cooccurrence(trace)
    top1 = co.max(-1).mean(-1) if co.size else np.zeros(0)
    return LayerStats(freq, entropy, reuse_distances(trace), reuse_next(trace), co, top1)
