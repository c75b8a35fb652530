"""`moe-tier trace stats|merge|import|predict`: inspect, combine and score routing traces."""

from __future__ import annotations

import argparse
import json

import numpy as np
from rich.console import Console
from rich.table import Table

from moe_tier.errors import MoeTierError
from router_predict import trace as tr
from router_predict.jsonl import read_jsonl
from router_predict.predictors import Combined, evaluate
from router_predict.replay import holdout
from router_predict.stats import layer_stats


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="routing traces: stats, merge, import, predictor scores")
    verbs = p.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser("stats", help="per-layer expert frequencies, entropy, reuse distance, co-occurrence")
    s.add_argument("traces", nargs="+", help="trace files (merged first)")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    m = verbs.add_parser("merge", help="concatenate traces of one model")
    m.add_argument("out")
    m.add_argument("traces", nargs="+")
    i = verbs.add_parser("import", help="convert JSON-lines routing records to a trace")
    i.add_argument("jsonl")
    i.add_argument("--out", required=True)
    i.add_argument("--model", help="GGUF the routing came from (sets fingerprint, arch, experts)")
    i.add_argument("--n-expert", type=int, help="experts per layer (without --model)")
    i.add_argument("--fingerprint", default="", help="model fingerprint (without --model)")
    i.add_argument("--arch", default="unknown", help="architecture (without --model)")
    i.add_argument("--prompt", action="store_true", help="the records are prompt tokens (default: generated)")
    r = verbs.add_parser("predict", help="recall@k and precision of the predictors, fitted and scored held out")
    r.add_argument("traces", nargs="+", help="traces to score (merged)")
    r.add_argument("--fit", nargs="+", help="traces to fit on (default: the first half of the sequences)")
    r.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    return {"stats": _stats, "merge": _merge, "import": _import, "predict": _predict}[args.verb](args)


def _load(paths: list[str]) -> tr.Trace:
    return tr.merge([tr.load(p) for p in paths])


def _stats(args) -> int:
    t = _load(args.traces)
    s = layer_stats(t)
    if args.json:
        print(json.dumps({
            "fingerprint": t.fingerprint, "arch": t.arch, "tokens": t.n_tokens, "prompt_tokens": int(t.is_prompt.sum()),
            "sequences": len(t.sequences()), "moe_layers": t.moe_layers.tolist(),
            "frequency": s.frequency.round(6).tolist(), "entropy_bits": s.entropy_bits.round(6).tolist(),
            "reuse_distance": [None if np.isnan(v) else round(float(v), 6) for v in s.reuse_distance],
            "reuse_next": [None if np.isnan(v) else round(float(v), 6) for v in s.reuse_next],
            "transition_top1": s.transition_top1.round(6).tolist(),
        }))
        return 0
    console = Console()
    console.print(f"[bold]{t.arch}[/] model {t.fingerprint[:16]}: {t.n_tokens} tokens "
                  f"({int(t.is_prompt.sum())} prompt) in {len(t.sequences())} sequences, "
                  f"{t.n_moe_layers} MoE layers, top-{t.n_expert_used} of {t.n_expert}, engine {t.engine}")
    table = Table("layer", "top expert", "share", "entropy bits", "of max", "reuse dist", "reused", "next top-1",
                  caption="reuse dist: mean tokens between uses of an expert; reused: share of the previous token's "
                          "experts chosen again; next top-1: mean max P(expert at l+1 | expert at l)")
    if t.n_expert <= 16:  # small enough to show every expert's share
        table.add_column(f"% per expert 0..{t.n_expert - 1}")
    for i, layer in enumerate(t.moe_layers):
        top = int(np.argmax(s.frequency[i]))
        nxt = f"{s.transition_top1[i]:.2f}" if i < len(s.transition_top1) else "-"
        shares = [" ".join(f"{100 * f:.0f}" for f in s.frequency[i])] if t.n_expert <= 16 else []
        table.add_row(str(layer), str(top), f"{s.frequency[i, top]:.1%}", f"{s.entropy_bits[i]:.2f}",
                      f"{s.entropy_bits[i] / np.log2(t.n_expert):.0%}", f"{s.reuse_distance[i]:.1f}",
                      f"{s.reuse_next[i]:.0%}", nxt, *shares)
    console.print(table)
    console.print(f"uniform routing would reuse {t.n_expert_used / t.n_expert:.0%} from the previous token and "
                  f"give a top-1 transition of {1 / t.n_expert:.2f}")
    return 0


def _merge(args) -> int:
    t = _load(args.traces)
    tr.save(t, args.out)
    Console(stderr=True).print(f"{args.out}: {t.n_tokens} tokens, {len(t.sequences())} sequences")
    return 0


def _import(args) -> int:
    if args.model:
        from moe_tier.reader import open_model  # only this verb needs a model

        desc = open_model(args.model)
        n_expert, fingerprint, arch, n_layer = desc.config.n_expert, desc.fingerprint, desc.arch, desc.config.n_layer
    elif args.n_expert:
        n_expert, fingerprint, arch, n_layer = args.n_expert, args.fingerprint, args.arch, None
    else:
        raise MoeTierError(args.jsonl, "give --model or --n-expert")
    t, dropped = read_jsonl(args.jsonl, n_expert=n_expert, fingerprint=fingerprint, arch=arch, n_layer=n_layer,
                            is_prompt=args.prompt)
    tr.save(t, args.out)
    Console(stderr=True).print(f"{args.out}: {t.n_tokens} tokens, {len(t.sequences())} sequences"
                               + (f"; dropped {dropped} tokens missing layers" if dropped else ""))
    return 0


def _predict(args) -> int:
    t = _load(args.traces)
    fit, test = (_load(args.fit), t) if args.fit else holdout(t)
    if args.fit:
        tr.check_same_model(fit, test)
    rows = evaluate(Combined.fit(fit), test)
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table("arch", "predictor", "layers ahead", "recall@k", "recall@2k", "precision@2k",
                  title=f"fitted on {fit.n_tokens} tokens, scored on {test.n_tokens} held-out tokens "
                        f"(k = {test.n_expert_used}; uniform recall@k = {test.n_expert_used / test.n_expert:.2f})")
    for r in rows:
        table.add_row(r["arch"], r["predictor"], str(r["distance"]), f"{r['recall@k']:.3f}", f"{r['recall@2k']:.3f}",
                      f"{r['precision@2k']:.3f}")
    Console().print(table)
    return 0
