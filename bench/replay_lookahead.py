"""What gate lookahead adds to the planner, on the trained demo model's routing and hidden states.

The demo (qwen3moe, 6 MoE layers x 8 experts, top-2) is recorded by moe-tier's engine on prompts of five
domains (bench/predictor_recall.py); the planner is fitted on half the prompts and replayed on the other
half, with and without gate lookahead: layer l+d's router, with its ridge correction fitted on the fitting half
(router_predict/lookahead.py), applied to layer l's hidden state, and layer l's own router predicting the next
token's routing there from the same state. The demo's experts are tiny,
so the cost model prices them as Mixtral-8x7B Q4_K experts on the measured H100 host: this compares the
policies' choices on real (small-model) routing, not the demo's own speed.
"""

from __future__ import annotations

import numpy as np

from bench import mixtral_routing as mx
from bench.predictor_recall import demo_split, fit_lookaheads, record_demo, router
from bench.replay_policies import COST, H2D_BYTES_PER_S, at_margins, margin_line, oracle_pinning, target_line
from bench.report import update_section
from router_predict.lookahead import FittedLookahead
from router_predict.policies import LFU, LRU, Belady, Planner, StaticPinning
from router_predict.predictors import MAX_DISTANCE, chosen, previous_token
from router_predict.replay import CacheConfig, fit_lfru, fit_planner, replay, tuning_split

SLOT_SHARES = (0.25, 0.5, 0.75)


def lookahead_scores(trace, states, engine, fit) -> np.ndarray:
    """(N, L, D, E): layer i+d's fitted lookahead on layer i's FFN input, the point that leaves layer i's
    experts to hide the copy behind; fitted on the tokens `fit` only."""
    layers, state = trace.moe_layers.tolist(), states["FFN input"]
    out = np.zeros((trace.n_tokens, len(layers), MAX_DISTANCE, trace.n_expert), np.float32)
    for (i, d), model in fit_lookaheads(trace, state, state, engine, fit).items():
        out[:, i, d - 1] = model.probs(state[layers[i]])
    return out


def next_token_scores(trace, states, engine, fit) -> np.ndarray:
    """(N, L, E): layer i's router, with a ridge correction fitted on the tokens `fit` only, on layer i's FFN input
    predicting the next token's routing there (pairs within a sequence)."""
    layers, state = trace.moe_layers.tolist(), states["FFN input"]
    _, has = previous_token(trace)
    pairs = fit & np.r_[has[1:], False]  # tokens with a successor in their sequence
    out = np.zeros((trace.n_tokens, len(layers), trace.n_expert), np.float32)
    for i, layer in enumerate(layers):
        model = FittedLookahead.fit(router(engine, layer), state[layer][pairs], state[layer][np.flatnonzero(pairs) + 1],
                                    trace.sequence[pairs], trace.n_expert_used)
        out[:, i] = model.probs(state[layer])
    return out


def perfect_scores(test) -> np.ndarray:
    """(N, L, D, E) the lookahead of an oracle: layer i+d's actual routing, as probabilities."""
    truth, L = chosen(test) / test.n_expert_used, test.n_moe_layers
    out = np.zeros((test.n_tokens, L, MAX_DISTANCE, test.n_expert), np.float32)
    for d in range(1, MAX_DISTANCE + 1):
        out[:, : L - d, d - 1] = truth[:, d:]
    return out


def perfect_next_token(test) -> np.ndarray:
    """(N, L, E) the next token's actual routing, as probabilities (none after a sequence's last token)."""
    truth = chosen(test) / test.n_expert_used
    _, has = previous_token(test)
    out = np.zeros_like(truth)
    out[:-1] = np.where(has[1:, None, None], truth[1:], 0.0)
    return out


def main() -> None:
    trace, states, engine = record_demo()
    fit_mask = demo_split(trace)
    scores = lookahead_scores(trace, states, engine, fit_mask)
    fit, test = trace.select(fit_mask), trace.select(~fit_mask)
    tuning_fit = np.zeros_like(fit_mask)  # settings are tuned on fitting prompts the lookahead was not fitted on
    tuning_fit[fit_mask] = tuning_split(fit)
    tuning_scores = lookahead_scores(trace, states, engine, tuning_fit)[fit_mask]
    next_token = next_token_scores(trace, states, engine, fit_mask)
    tuning_next = next_token_scores(trace, states, engine, tuning_fit)[fit_mask]
    eb = np.full(trace.n_moe_layers * trace.n_expert, mx.EXPERT_BYTES, np.int64)
    cost = COST
    body = (f"Demo qwen3moe routing: fitted on {fit.n_tokens} tokens, replayed on {test.n_tokens} held-out tokens "
            f"({int(test.is_prompt.sum())} of them prompt tokens, decoded one per step here); experts priced as "
            "Mixtral-8x7B Q4_K on the H100 host (bench/replay_policies.py's cost model). The planner's settings "
            "(and how much it trusts gate lookahead) are tuned on the fitting prompts only: predictors and "
            "lookahead fitted on half of them, settings scored on the other half (replay.fit_planner). "
            "The planner also mixes the next token's gate lookahead (layer l's router, ridge-corrected on the "
            "fitting prompts, on layer l's FFN input, predicting the next token's routing at layer l) into each "
            "layer's next visit, which ranks evictions. \"Perfect lookahead\" hands the same planner the true "
            "routing of the next four layers and of the next token: an expert copy "
            f"takes {mx.EXPERT_BYTES / H2D_BYTES_PER_S * 1e3:.1f} ms of link, a layer step whose experts all hit "
            f"{cost.gpu_s(2 * mx.EXPERT_BYTES) * 1e3:.2f} ms, so a prefetch for this token's next layers lands in "
            "time only where the link idles that long. Misses run as decode runs them (see replay-policies): "
            "staged with the CPU's share, or whole on the CPU where the link is busy, a cached one also copied "
            "into its slot behind the step; static pinning's misses run on the CPU, as llama.cpp's do. Under that "
            "cost model the planner's tuned link value (see replay-policies) lets a refused miss run whole on the "
            "CPU, or a cached one wait for its copy, where staging would end the step only a little sooner, "
            "leaving the link to prefetches; the step lasts as long as the path taken. Before the link value the "
            "gate-lookahead planner reached 0.544, 0.800 and 0.945 at 12, 24 and 36 slots, at 127.7, 192.8 and "
            "568.4 tokens/s; before this cost model (a miss not cached ran whole on the CPU, leaving the link idle "
            "for prefetches) 0.618 at 12 slots and 0.821 at 24, at 134.0 and 262.1 tokens/s. Tuned by tokens/s "
            "instead (a development check), the gate-lookahead planner took link value 0 and ran 170.2, 301.2 "
            "and 674.4 tokens/s at 12, 24 and 36 slots at hit rates 0.483, 0.726 and 0.917, and gate lookahead "
            "added nothing: staging and promotions leave the link little idle time for prefetches. "
            "The planner ranks a copy that would land after its layer runs by the visit after (a late "
            "copy is a miss there and only evicts). \"Of Belady\" is against Belady with bypass, the hit-rate "
            "optimum of a cache without prefetch; the target line is the issue's (the gate-lookahead planner "
            "against the best of LRU/LFU/LFRU).\n")
    for share in SLOT_SHARES:
        cache = CacheConfig(1, int(eb.size * share))
        with_lookahead = fit_planner(fit, cost, cache, eb, lookahead=tuning_scores, next_token=tuning_next).s
        perfect = Planner(cost, with_lookahead, lookahead=perfect_scores(test), next_token=perfect_next_token(test))
        perfect.name = "planner + perfect lookahead (oracle; the gate-lookahead planner's settings)"
        gated = Planner(cost, with_lookahead, lookahead=scores[~fit_mask], next_token=next_token[~fit_mask])
        policies = [LRU(), LFU(), fit_lfru(fit, cost, cache, eb), StaticPinning(), fit_planner(fit, cost, cache, eb),
                    gated, perfect,
                    Belady(test, allow_bypass=False), Belady(test)]
        results = [replay(p, test, fit, cost, cache, eb) for p in policies]
        belady = results[-1].hit_rate
        body += (f"\n### {cache.slots_per_gpu} slots for {eb.size} experts\n\n"
                 "| policy | hit rate | of Belady | GB moved / token | staged | on CPU | est. tokens/s |\n"
                 "|---|---|---|---|---|---|---|\n")
        body += "".join(f"| {r.policy} | {r.hit_rate:.3f} | {r.hit_rate / belady:.0%} | "
                        f"{r.h2d_bytes_per_token / 1e9:.2f} | {r.staged_share:.0%} | {r.cpu_share:.0%} | {r.tokens_per_s:.1f} |\n"
                        for r in results)
        oracle = oracle_pinning(test, cache.slots_per_gpu)
        margins = [replay(p, test, fit, cost, cache, eb) for p in at_margins(gated)]
        body += f"\nOracle pinning (the scored prompts' own most-used experts): hit rate {oracle:.3f}. " + \
            margin_line([margins]).replace("tuned planner", "gate-lookahead planner") + \
            target_line(results[5].hit_rate, [r.hit_rate for r in results[:3]], belady)
    update_section("replay-lookahead", "python -m bench.replay_lookahead", body)
    print(body)


if __name__ == "__main__":
    main()
