"""Each layer's next visit: the chance that the next token chooses an expert, a least-squares mixture of features.

Shape key: N tokens, L MoE layers, E experts per layer, H half-lives, F features (3 + H + a constant).
The features of (layer, expert) once a token has been routed at that layer: the frequency prior, whether this
token chose it, the token-reuse prediction from this token's routing, and its uses with exponential forgetting
at several half-lives (reset to the prior when a sequence starts). The planner's eviction rank leans on this
chance, so the fit may target the uses of the next few tokens, discounted, rather than the next one's alone: an
expert chosen in a burst is back soon but not for long, and eviction looks further than one token. Fitted
weights replace the hand-set mixture where the fitting traces are long enough to fit them (the planner's tuning
decides which, and over how many tokens). The planner applies the weights online, in `features`' order, in
`online.update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router_predict.predictors import FrequencyPrior, TokenReuse, chosen, previous_token, selections
from router_predict.trace import Trace

HALF_LIVES_TOKENS = (1.0, 4.0, 16.0, 64.0)
DECAY = 0.5 ** (1.0 / np.array(HALF_LIVES_TOKENS))  # (H,) per token


def features(prior: np.ndarray, chose: np.ndarray, reuse: np.ndarray, decayed: np.ndarray) -> np.ndarray:
    """(..., E, F) from the prior (..., E), this token's choice (..., E), the reuse prediction (..., E) and the
    forgetting counts (H, ..., E)."""
    return np.stack([prior, chose, reuse, *decayed, np.ones_like(prior)], -1)


def forget(decayed: np.ndarray, chose: np.ndarray) -> None:
    """Fold one token's choice (..., E) into the forgetting counts (H, ..., E), in place."""
    shape = (-1,) + (1,) * chose.ndim
    decayed *= DECAY.reshape(shape)
    decayed += (1.0 - DECAY).reshape(shape) * chose


@dataclass(frozen=True)
class NextVisit:
    weights: np.ndarray  # (F,)

    @classmethod
    def fit(cls, trace: Trace, prior: FrequencyPrior, reuse: TokenReuse,
            horizon_tokens: float = 1.0) -> "NextVisit":
        """Least squares from every token's features to the choices that follow it within its sequence, the n-th
        next token weighted (1 - 1 / horizon_tokens)^(n-1) (normalised): 1 is the next token's choices alone."""
        use, sel = chosen(trace), selections(trace)  # (N, L, E)
        decayed = np.repeat(prior.prob[None], len(HALF_LIVES_TOKENS), 0)
        rows = np.empty((trace.n_tokens, *use.shape[1:], 4 + len(HALF_LIVES_TOKENS)))  # (N, L, E, F)
        for t in range(trace.n_tokens):
            if t == 0 or trace.sequence[t] != trace.sequence[t - 1]:
                decayed[:] = prior.prob
            forget(decayed, use[t])
            rows[t] = features(prior.prob, use[t], np.einsum("le,lef->lf", sel[t], reuse.table), decayed)
        prev, has = previous_token(trace)
        x, y = rows[prev[has]], upcoming(trace, use, horizon_tokens)[has]  # features of token t-1 -> token t on
        if not len(y):
            return cls(np.r_[1.0, np.zeros(rows.shape[-1] - 1)])  # no pairs: the prior alone
        weights = np.linalg.lstsq(x.reshape(-1, x.shape[-1]), y.reshape(-1), rcond=None)[0]
        return cls(weights)


def upcoming(trace: Trace, use: np.ndarray, horizon_tokens: float) -> np.ndarray:
    """(N, L, E) each token's uses (N, L, E) and the ones after it in its sequence, weighted (1 - 1 / h)^n,
    divided by the sum of the weights present (so a sequence's last tokens are not counted as unused after it)."""
    g = 1.0 - 1.0 / horizon_tokens
    num, den = np.zeros_like(use), np.zeros(trace.n_tokens)
    for t in range(trace.n_tokens - 1, -1, -1):
        more = t + 1 < trace.n_tokens and trace.sequence[t + 1] == trace.sequence[t]
        num[t] = use[t] + g * num[t + 1] if more else use[t]
        den[t] = 1.0 + g * den[t + 1] if more else 1.0
    return num / den[:, None, None]
