"""The planner's predictions, brought up to date once per layer step in one compiled call.

Shape key: L MoE layers, E experts per layer, D lookahead layers, K experts routed now, H forgetting half-lives,
F next-visit features (3 + H + a constant, in `next_visit.features` order), n <= D gate-lookahead rows.
A dozen small numpy operations per step cost more than the decision itself; compiled, the predictions and
`plan_step` together stay within the per-step budget.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def update(layer, experts, shares, prior, cross, mix, reuse, gate, gate_weight, next_gate, next_weight, counts,
           decayed, decay, online_weight, recency_weight, visit_weights, forgetting, forget_decay, recent, ahead):
    """Fill ahead (D, E) and this layer's row of recent (L, E) from the routing just made, in place.

    experts (K,) chosen at `layer` (ids within the layer), shares (K,) their gate weights summing to 1;
    prior (L, E); cross (D, L, E, E) and mix (D, 3) of `predictors.Combined`; reuse (L, E, E) token reuse;
    gate (n, E) gate-lookahead probabilities for layers layer+1..layer+n (n = 0: none) and how much they
    count; next_gate (E,) the next token's gate lookahead at this layer (size 0: none) and how much it counts
    in this layer's next visit; counts (L, E) uses so far; decayed (L, E) uses with forgetting at `decay` per
    token; the mixture weights of the next visit; visit_weights (F,) fitted ones instead (size 0: use the mixture) with
    forgetting (H, L, E) at forget_decay (H,) per token.
    """
    L, E = prior.shape
    D, K = ahead.shape[0], experts.shape[0]
    ahead[:] = 0.0
    for d in range(1, min(D, L - 1 - layer) + 1):  # this token's next layers: prior, cross-layer, next visit
        m = layer + d
        a, b, c = mix[d - 1, 0], mix[d - 1, 1], mix[d - 1, 2]
        for f in range(E):
            v = a * prior[m, f] + c * recent[m, f]
            for k in range(K):
                v += b * shares[k] * cross[d - 1, layer, experts[k], f]
            ahead[d - 1, f] = v
    for d in range(gate.shape[0]):  # a softmax share of p is a chance of about K * p to be in the top K
        for f in range(E):
            ahead[d, f] = gate_weight * min(gate[d, f] * K, 1.0) + (1.0 - gate_weight) * ahead[d, f]
    row = recent[layer]
    for k in range(K):
        counts[layer, experts[k]] += 1.0
    total = counts[layer].sum()
    for f in range(E):
        decayed[layer, f] *= decay
        p = 0.0
        for k in range(K):
            p += shares[k] * reuse[layer, experts[k], f]
        row[f] = p  # token reuse for now; the mixture below
    for k in range(K):
        decayed[layer, experts[k]] += 1.0 - decay
    if visit_weights.shape[0] == 0:
        for f in range(E):
            freq = counts[layer, f] * K / total
            row[f] = (1.0 - recency_weight) * (online_weight * freq + (1.0 - online_weight) * row[f]) + \
                recency_weight * decayed[layer, f]
    else:
        H = forget_decay.shape[0]
        for f in range(E):
            chose = 0.0
            for k in range(K):
                if experts[k] == f:
                    chose = 1.0
            v = visit_weights[0] * prior[layer, f] + visit_weights[1] * chose + visit_weights[2] * row[f]
            for h in range(H):
                forgetting[h, layer, f] = forget_decay[h] * forgetting[h, layer, f] + (1.0 - forget_decay[h]) * chose
                v += visit_weights[3 + h] * forgetting[h, layer, f]
            row[f] = v + visit_weights[3 + H]
    for f in range(next_gate.shape[0]):
        row[f] = next_weight * min(next_gate[f] * K, 1.0) + (1.0 - next_weight) * row[f]
