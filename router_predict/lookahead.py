"""Gate lookahead: layer l+d's router applied to the hidden state at layer l, plain or with a fitted correction.

Shape key: T tokens, H hidden size, E experts per layer, F ridge strengths tried.
The residual stream changes little across a few layers, so a later router already ranks its experts from an
earlier hidden state; what it does change is partly linear in that state, so a ridge fit of the missing part
of layer l+d's logits, folded into the router, predicts better at the same cost: one (E, H) matrix per
(layer, distance), cheap enough to run on the device beside the router (the engine does not run it yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ridge strengths tried, in units of the mean eigenvalue of the centred states' Gram matrix; inf = plain router
RIDGES = (0.03, 0.1, 0.3, 1.0, 3.0, np.inf)
MAX_FOLDS = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def gate_lookahead(router: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """(T, E) softmax of layer l+d's router (E, H) applied to the hidden state at layer l (T, H)."""
    return softmax(hidden.astype(np.float32) @ router.astype(np.float32).T)


def _centred(logits: np.ndarray) -> np.ndarray:
    """Softmax ignores a shift per token, so the fit does too."""
    return logits - logits.mean(-1, keepdims=True)


def _ridge_solutions(x: np.ndarray, y: np.ndarray, ridges: tuple[float, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each ridge strength, (H, E) B and (E,) c minimising |y - x B - c|^2 + lam |B|^2 (one eigendecomposition);
    an infinite strength gives no correction at all."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = (x - mean_x).astype(np.float64)
    gram_vals, gram_vecs = np.linalg.eigh(xc.T @ xc)
    proj = gram_vecs.T @ (xc.T @ (y - mean_y))  # (H, E)
    scale = max(float(gram_vals.mean()), 1e-12)
    out = []
    for lam in ridges:
        if np.isinf(lam):  # no correction at all: the plain router
            out.append((np.zeros((x.shape[1], y.shape[1])), np.zeros(y.shape[1])))
            continue
        b = gram_vecs @ (proj / (np.maximum(gram_vals, 0.0) + lam * scale)[:, None])
        out.append((b, mean_y - mean_x @ b))
    return out


def _topk_recall(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    top_pred = np.argpartition(-pred, k - 1, -1)[:, :k]
    top_true = np.argpartition(-truth, k - 1, -1)[:, :k]
    return float((top_pred[:, :, None] == top_true[:, None, :]).any(-1).mean())


@dataclass(frozen=True)
class FittedLookahead:
    """Layer l+d's router with a ridge-fitted correction: logits = hidden @ weight.T + bias.

    Fitted on the states at layer l (the source) and the logits layer l+d's router gave for the same tokens;
    the ridge strength is chosen by cross-validation over whole sequences of the fitting tokens, and the
    plain router (no correction) is one of the choices, so fitting never makes the lookahead worse there.
    """

    weight: np.ndarray  # (E, H) router of layer l+d plus the fitted correction
    bias: np.ndarray  # (E,)
    ridge: float  # the chosen strength (inf: the plain router)

    @classmethod
    def fit(cls, router: np.ndarray, source: np.ndarray, router_input: np.ndarray, groups: np.ndarray, k: int,
            ridges: tuple[float, ...] = RIDGES) -> "FittedLookahead":
        """router (E, H) of layer l+d with its norm weight folded in; source (T, H) the state at layer l;
        router_input (T, H) what layer l+d's router saw for the same tokens; groups (T,) sequence ids;
        k experts used per token (the cross-validation scores recall@k)."""
        router = router.astype(np.float64)
        source = source.astype(np.float64)
        base = source @ router.T
        residual = _centred(router_input.astype(np.float64) @ router.T) - _centred(base)  # (T, E)
        truth = router_input @ router.T
        ids = np.unique(groups)
        folds = np.array_split(ids, min(MAX_FOLDS, len(ids))) if len(ids) > 1 else []
        score = np.zeros(len(ridges))
        for held in folds:
            test = np.isin(groups, held)
            for i, (b, c) in enumerate(_ridge_solutions(source[~test], residual[~test], ridges)):
                score[i] += _topk_recall(base[test] + source[test] @ b + c, truth[test], k) * test.sum()
        best = int(np.argmax(score)) if folds else ridges.index(np.inf) if np.inf in ridges else 0
        b, c = _ridge_solutions(source, residual, (ridges[best],))[0]
        return cls((router + b.T).astype(np.float32), c.astype(np.float32), float(ridges[best]))

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden.astype(np.float32) @ self.weight.T + self.bias

    def probs(self, hidden: np.ndarray) -> np.ndarray:
        """(T, E) predicted routing probabilities of layer l+d."""
        return softmax(self.logits(hidden))
