"""Predictors of which experts the next 1..D layers will choose, fitted on traces in well under a second.

Shape key: N tokens, L MoE layers, K experts chosen per token, E experts per layer, D lookahead distance,
H hidden size. A prediction is an expected-use vector over E (each entry in [0, 1], summing to about K);
`pred[n, m]` is made once layer m-d of token n (and all of token n-1) has been routed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router_predict.trace import Trace

MAX_DISTANCE = 4
SMOOTHING = 0.5  # pseudo-selections of the frequency prior added to every conditional row


def selections(trace: Trace, weighted: bool = True) -> np.ndarray:
    """(N, L, E) gate weight (or 1/K) of each chosen expert, 0 elsewhere; rows sum to 1."""
    n, L, K = trace.expert_ids.shape
    out = np.zeros((n, L, trace.n_expert), dtype=np.float32)
    w = trace.weights / np.maximum(trace.weights.sum(-1, keepdims=True), 1e-12) if weighted else \
        np.full(trace.weights.shape, 1.0 / K, dtype=np.float32)
    np.add.at(out, (np.arange(n)[:, None, None], np.arange(L)[None, :, None], trace.expert_ids), w)
    return out


def chosen(trace: Trace) -> np.ndarray:
    """(N, L, E) 1 where the expert was chosen."""
    return (selections(trace, weighted=False) > 0).astype(np.float32)


def previous_token(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Index of each token's predecessor in its sequence (N,) and whether it has one (N,)."""
    prev = np.arange(trace.n_tokens) - 1
    has = np.zeros(trace.n_tokens, dtype=bool)
    has[1:] = trace.sequence[1:] == trace.sequence[:-1]
    return np.maximum(prev, 0), has


def _conditional(src: np.ndarray, dst: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(E, E) expected uses of each target expert given one selection of each source expert, prior-smoothed."""
    joint = src.T @ dst  # (E, E)
    n_src = src.sum(0)[:, None]
    return (joint + SMOOTHING * prior[None, :]) / (n_src + SMOOTHING)


@dataclass(frozen=True)
class FrequencyPrior:
    prob: np.ndarray  # (L, E) expected uses per token

    @classmethod
    def fit(cls, trace: Trace) -> "FrequencyPrior":
        return cls(chosen(trace).mean(0) if trace.n_tokens else
                   np.full((trace.n_moe_layers, trace.n_expert), trace.n_expert_used / trace.n_expert))

    def predict_all(self, trace: Trace, d: int) -> np.ndarray:
        return np.broadcast_to(self.prob, (trace.n_tokens, *self.prob.shape))


@dataclass(frozen=True)
class CrossLayer:
    """Experts at layer l to layers l+1 .. l+D of the same token."""

    table: np.ndarray  # (D, L, E, E) table[d-1, l] maps a selection at l to expected uses at l+d

    @classmethod
    def fit(cls, trace: Trace, prior: FrequencyPrior, max_distance: int = MAX_DISTANCE) -> "CrossLayer":
        sel, use = selections(trace, weighted=False), chosen(trace)
        L, E = trace.n_moe_layers, trace.n_expert
        table = np.zeros((max_distance, L, E, E), dtype=np.float32)
        for d in range(1, max_distance + 1):
            for l in range(L - d):
                table[d - 1, l] = _conditional(sel[:, l], use[:, l + d], prior.prob[l + d])
        return cls(table)

    def predict_all(self, trace: Trace, d: int) -> np.ndarray:
        sel = selections(trace)
        out = np.zeros_like(sel)
        out[:, d:] = np.einsum("nle,lef->nlf", sel[:, :-d], self.table[d - 1, : trace.n_moe_layers - d])
        return out


@dataclass(frozen=True)
class TokenReuse:
    """Experts a layer chose for the previous token to what it chooses for this one."""

    table: np.ndarray  # (L, E, E)
    prior: np.ndarray  # (L, E) used for a sequence's first token

    @classmethod
    def fit(cls, trace: Trace, prior: FrequencyPrior) -> "TokenReuse":
        sel, use = selections(trace, weighted=False), chosen(trace)
        prev, has = previous_token(trace)
        L = trace.n_moe_layers
        table = np.stack([_conditional(sel[prev[has], l], use[has, l], prior.prob[l]) for l in range(L)])
        return cls(table.astype(np.float32), prior.prob)

    def predict_all(self, trace: Trace, d: int) -> np.ndarray:
        sel = selections(trace)
        prev, has = previous_token(trace)
        out = np.einsum("nle,lef->nlf", sel[prev], self.table)
        out[~has] = self.prior
        return out


@dataclass(frozen=True)
class Combined:
    """A per-distance linear mixture of the prior, cross-layer and reuse predictions, weights fitted by grid."""

    prior: FrequencyPrior
    cross: CrossLayer
    reuse: TokenReuse
    mix: np.ndarray  # (D, 3) weights of (prior, cross, reuse) for each distance

    @classmethod
    def fit(cls, trace: Trace, max_distance: int = MAX_DISTANCE, grid_step: float = 0.1) -> "Combined":
        prior = FrequencyPrior.fit(trace)
        cross, reuse = CrossLayer.fit(trace, prior, max_distance), TokenReuse.fit(trace, prior)
        parts = [prior, cross, reuse]
        truth = chosen(trace)
        grid = [(a, b, round(1 - a - b, 6)) for a in np.arange(0, 1 + 1e-9, grid_step)
                for b in np.arange(0, 1 - a + 1e-9, grid_step)]
        mix = np.zeros((max_distance, 3))
        for d in range(1, min(max_distance, trace.n_moe_layers - 1) + 1):  # no layer lies further ahead
            preds = [p.predict_all(trace, d)[:, d:] for p in parts]
            scores = [recall_at(sum(w * p for w, p in zip(ws, preds)), truth[:, d:], trace.n_expert_used)
                      for ws in grid]
            mix[d - 1] = grid[int(np.argmax(scores))]
        return cls(prior, cross, reuse, mix)

    def predict_all(self, trace: Trace, d: int) -> np.ndarray:
        a, b, c = self.mix[d - 1]
        return a * self.prior.predict_all(trace, d) + b * self.cross.predict_all(trace, d) + \
            c * self.reuse.predict_all(trace, d)


def topk_mask(pred: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-pred, k - 1, axis=-1)[..., :k]
    mask = np.zeros(pred.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def recall_at(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the chosen experts that are among the k highest predictions."""
    return float((topk_mask(pred, k) & (truth > 0)).sum() / max((truth > 0).sum(), 1))


def precision_at(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the k highest predictions that were chosen."""
    hits = (topk_mask(pred, k) & (truth > 0)).sum()
    return float(hits / max(pred[..., 0].size * k, 1))


def evaluate(model: Combined, test: Trace, max_distance: int = MAX_DISTANCE) -> list[dict]:
    """Recall@K, recall@2K and precision@2K of every predictor for distances 1..D on held-out tokens."""
    truth, K = chosen(test), test.n_expert_used
    parts = {"frequency prior": model.prior, "cross-layer": model.cross, "token reuse": model.reuse,
             "combined": model}
    rows = []
    for name, p in parts.items():
        for d in range(1, min(max_distance, test.n_moe_layers - 1) + 1):
            pred, t = p.predict_all(test, d)[:, d:], truth[:, d:]
            rows.append({"arch": test.arch, "predictor": name, "distance": d, "recall@k": recall_at(pred, t, K),
                         "recall@2k": recall_at(pred, t, 2 * K), "precision@2k": precision_at(pred, t, 2 * K)})
    return rows
