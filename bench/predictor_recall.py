"""Recall of the expert predictors for the next 1-4 layers, held out, per architecture.

llama (Mixtral-8x7B, real routing from ../shared/data/routing): fitted on one GSM8K problem, scored on the
other, both ways. qwen3moe (data/demo-moe.gguf, the trained demo): routing and hidden states recorded by
moe-tier's engine on prompts of five domains (sampled, seeded), fitted on half the prompts and scored on the
other half; gate lookahead (layer l+d's router on layer l's hidden state, from two points of layer l) plain
and with the ridge correction fitted on the fitting half (router_predict/lookahead.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import mixtral_routing as mx
from bench.report import update_section
from moe_tier.engine import Engine
from moe_tier.sampling import SamplingConfig
from router_predict.lookahead import FittedLookahead, gate_lookahead
from router_predict.predictors import MAX_DISTANCE, Combined, chosen, evaluate, precision_at, recall_at
from router_predict.recorder import TraceRecorder
from router_predict.trace import Trace

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo-moe.gguf"
N_NEW = 128
SAMPLING = dict(temperature=0.7, top_p=0.95)  # greedy decoding of the toy model loops; seeded per prompt
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n",
    "And God said, Let there be light: and there was light. And God saw the light,",
    "In the beginning was the Word, and the Word was with God,",
    "Die Paketverwaltung von Debian installiert Software aus den Archiven,",
    "Der Systemverwalter richtet das Netzwerk mit der Datei /etc/network/interfaces ein",
    "Le gestionnaire de paquets de Debian installe les logiciels depuis les archives,",
    "Pour configurer le réseau, l'administrateur modifie le fichier",
    ".. function:: open(file, mode='r')\n\n   Open *file* and return a corresponding",
    "The apt-get command installs packages from the Debian archive; to upgrade the system,",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "for i, line in enumerate(open(path)):\n    fields = line.split(",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel,",
    "The quick brown fox jumps over the lazy dog, and the farmer",
    "Die Stadt liegt am Ufer des Flusses und hat etwa zehntausend Einwohner.",
    "Mit dem Befehl apt-get install werden Pakete aus dem Archiv installiert, und",
    "La ville est située au bord de la rivière et compte environ",
    "Pour installer le programme, tapez la commande suivante :",
    "Installation\n============\n\nTo install the package, run::\n\n",
    ".. note::\n\n   This module is deprecated since version 3.2; use",
]


def record_demo() -> tuple[Trace, dict[str, dict[int, np.ndarray]], Engine]:
    """Greedy generation on every prompt: the trace, and per layer the RMS-normalised residual (N, D) at two
    points: "FFN input" (after layer l's attention) and "output" (after layer l's experts)."""
    engine = Engine.open(DEMO, ctx=512)
    d, c = engine.desc, engine.desc.config
    rec = TraceRecorder(fingerprint=d.fingerprint, arch=d.arch, n_layer=c.n_layer, n_expert=c.n_expert,
                        n_expert_used=c.n_expert_used, moe_layers=d.moe_layers, engine="moe-tier")
    taps: dict[str, dict[int, list[np.ndarray]]] = {"FFN input": {}, "output": {}}
    w = engine.weights

    class Tap:
        """The recorder plus the engine's hidden-state hook, with the norm weights divided out so that any
        layer's router can be applied with its own."""

        record = staticmethod(rec.record)

        @staticmethod
        def hidden(il: int, where: str, h: np.ndarray) -> None:
            if where == "ffn_in":
                taps["FFN input"].setdefault(il, []).append(h / w.vector(f"blk.{il}.ffn_norm.weight"))
            elif il > 0:
                taps["output"].setdefault(il - 1, []).append(h / w.vector(f"blk.{il}.attn_norm.weight"))

    for seed, prompt in enumerate(PROMPTS):
        ids = engine.tokenize(prompt)
        rec.begin_sequence(ids)
        for token in engine.generate_tokens(ids, N_NEW, SamplingConfig(**SAMPLING, seed=seed), observer=Tap):
            rec.generated(token)
    states = {kind: {il: np.concatenate(h).astype(np.float32) for il, h in per.items()} for kind, per in taps.items()}
    return rec.trace(), states, engine


def demo_split(trace: Trace) -> np.ndarray:
    """(N,) True for the fitting half: every other prompt, so each domain is on both sides."""
    return np.isin(trace.sequence, trace.sequences()[::2])


def router(engine: Engine, layer: int) -> np.ndarray:
    """(E, D) layer `layer`'s router with its norm weight folded in: it applies to a normalised residual."""
    w = engine.weights
    m = w.matrix(f"blk.{layer}.ffn_gate_inp.weight")
    return m.rows(np.arange(m.n_rows)) * w.vector(f"blk.{layer}.ffn_norm.weight")[None, :]


def fit_lookaheads(trace: Trace, state: dict[int, np.ndarray], router_in: dict[int, np.ndarray], engine: Engine,
                   fit: np.ndarray) -> dict[tuple[int, int], FittedLookahead]:
    """(i, d) -> the fitted lookahead from MoE layer i's `state` to layer i+d, fitted on the tokens `fit` only."""
    layers = trace.moe_layers.tolist()
    return {(i, d): FittedLookahead.fit(router(engine, layers[i + d]), state[src][fit], router_in[layers[i + d]][fit],
                                        trace.sequence[fit], trace.n_expert_used)
            for i, src in enumerate(layers) if src in state
            for d in range(1, min(MAX_DISTANCE, len(layers) - 1 - i) + 1)}


def lookahead_rows(trace: Trace, states: dict[str, dict[int, np.ndarray]], engine: Engine) -> list[dict]:
    """Gate lookahead from each tap point, plain and fitted on the fitting half; both scored on the other half."""
    truth, K, layers = chosen(trace), trace.n_expert_used, trace.moe_layers.tolist()
    fit = demo_split(trace)
    rows = []
    for kind, state in states.items():
        fitted = fit_lookaheads(trace, state, states["FFN input"], engine, fit)
        for name in ("gate lookahead", "fitted gate lookahead"):
            for d in range(1, MAX_DISTANCE + 1):
                pairs = [(i, layers[i - d]) for i in range(d, len(layers)) if layers[i - d] in state]
                p = np.stack([gate_lookahead(router(engine, layers[i]), state[src][~fit]) if name == "gate lookahead"
                              else fitted[i - d, d].probs(state[src][~fit]) for i, src in pairs], 1)
                t = np.stack([truth[~fit, i] for i, _ in pairs], 1)
                rows.append({"arch": trace.arch, "predictor": f"{name} (layer l's {kind})", "distance": d,
                             "recall@k": recall_at(p, t, K), "recall@2k": recall_at(p, t, 2 * K),
                             "precision@2k": precision_at(p, t, 2 * K)})
    return rows


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    keys = ("recall@k", "recall@2k", "precision@2k")
    return [{**r, **{k: float(np.mean([run[i][k] for run in runs])) for k in keys}} for i, r in enumerate(runs[0])]


def table(rows: list[dict]) -> str:
    out = "| arch | predictor | layers ahead | recall@k | recall@2k | precision@2k |\n|---|---|---|---|---|---|\n"
    return out + "".join(f"| {r['arch']} | {r['predictor']} | {r['distance']} | {r['recall@k']:.3f} | "
                         f"{r['recall@2k']:.3f} | {r['precision@2k']:.3f} |\n" for r in rows)


def main() -> None:
    mixtral = mx.load()
    mixtral_rows = mean_rows([evaluate(Combined.fit(fit), test) for _, fit, test in mx.folds(mixtral)])
    demo, states, engine = record_demo()
    half = demo_split(demo)
    demo_rows = evaluate(Combined.fit(demo.select(half)), demo.select(~half)) + lookahead_rows(demo, states, engine)
    body = (f"k = experts per token (2 for both). Uniform routing would give recall@k = 0.25.\n\n"
            f"**llama: Mixtral-8x7B-Instruct**, {mixtral.n_tokens} generated GSM8K tokens, mean of the two "
            "held-out folds (no hidden states in these traces, so no gate lookahead).\n\n" + table(mixtral_rows) +
            f"\n**qwen3moe: the trained demo model** ({demo.n_moe_layers} MoE layers, {demo.n_expert} experts), "
            f"{demo.n_tokens} tokens ({int(demo.is_prompt.sum())} prompt) over {len(PROMPTS)} prompts in five "
            f"domains (sampled at temperature {SAMPLING['temperature']:g}, seeded); fitted on half the prompts, "
            "scored on the other half. Gate lookahead is layer l+d's router on layer l's FFN input (the "
            "router's own input: the layer's experts still to run give the prefetch its time) or on layer l's "
            "output (closer to layer l+1, with only layer l+1's attention left to hide a copy behind); the "
            "fitted one adds a ridge-fitted correction of layer l+d's logits, linear in the same state and "
            "folded into the router (one 8 x 384 matrix per layer pair, ridge strength chosen by "
            "cross-validation over the fitting prompts).\n\n"
            + table(demo_rows))
    update_section("predictor-recall", "python -m bench.predictor_recall", body)
    print(body)


if __name__ == "__main__":
    main()
