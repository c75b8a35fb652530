"""Record the demo model's routing on held-out text of each domain: the predictor's test fixtures.

Each domain's first documents of the held-out split (tools/demo_corpus.py), cut to PROMPT_TOKENS tokens,
run through moe-tier's engine with a TraceRecorder as routing observer, then GENERATED greedy tokens.
Writes tests/fixtures/demo-traces/<domain>.npz (the moe-tier trace format, router_predict/trace.py).

    python tools/demo_traces.py --corpus .carry/demo/corpus [--docs 12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_tier.engine import Engine
from router_predict import trace as tr
from router_predict.recorder import TraceRecorder

DOMAINS = ("python", "english", "german", "french", "rst")
PROMPT_TOKENS = 160
GENERATED = 16
ROOT = Path(__file__).resolve().parent.parent


def record(engine: Engine, documents: list[str]) -> tr.Trace:
    d, c = engine.desc, engine.desc.config
    recorder = TraceRecorder(fingerprint=d.fingerprint, arch=d.arch, n_layer=c.n_layer, n_expert=c.n_expert,
                             n_expert_used=c.n_expert_used, moe_layers=d.moe_layers, engine="moe-tier")
    for text in documents:
        ids = engine.tokenize(text)[:PROMPT_TOKENS]
        recorder.begin_sequence(ids)
        for token in engine.generate_tokens(ids, GENERATED, observer=recorder):
            recorder.generated(token)
    return recorder.trace()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, required=True, help="folder with <domain>.heldout.jsonl")
    ap.add_argument("--model", type=Path, default=ROOT / "data" / "demo-moe.gguf")
    ap.add_argument("--docs", type=int, default=12, help="held-out documents per domain")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "demo-traces")
    args = ap.parse_args()
    engine = Engine.open(args.model, ctx=PROMPT_TOKENS + GENERATED)
    args.out.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        lines = (args.corpus / f"{domain}.heldout.jsonl").read_text().splitlines()
        docs = [doc for doc in (json.loads(line) for line in lines) if len(doc) > 400][: args.docs]
        trace = record(engine, docs)
        tr.save(trace, args.out / f"{domain}.npz")
        print(f"{domain}: {trace.n_tokens} tokens from {len(docs)} documents")


if __name__ == "__main__":
    main()
