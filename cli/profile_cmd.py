"""`moe-tier profile MODEL --prompts FILE --out TRACE`: record every token's routing while generating."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from moe_tier.errors import MoeTierError
from router_predict import trace as tr
from router_predict.recorder import TraceRecorder

ENGINES = ("moe-tier", "llama.cpp")


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="record the experts every token chooses (prompt and generated)")
    p.add_argument("model", help="GGUF file")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="trace file to write (npz)")
    p.add_argument("--engine", choices=ENGINES, default="moe-tier", help="which engine runs the model")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads")
    p.add_argument("--ctx", type=int, default=4096, help="moe-tier context: longest prompt + max tokens")


def read_prompts(path: str) -> list[str]:
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise MoeTierError(path, f"cannot read prompts: {err}") from None
    if not prompts:
        raise MoeTierError(path, "no prompts (one per line)")
    return prompts


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise MoeTierError(None, f"--max-tokens must be 0 or more, got {args.max_tokens}")
    prompts = read_prompts(args.prompts)
    if args.engine == "llama.cpp":
        from moe_tier.profile_llama import profile_llama

        trace = profile_llama(args.model, prompts, args.max_tokens, args.threads)
    else:
        trace = profile_engine(args.model, prompts, args.max_tokens, args.ctx)
    tr.save(trace, args.out)
    Console(stderr=True).print(f"{args.out}: {trace.n_tokens} tokens ({int(trace.is_prompt.sum())} prompt) from "
                               f"{len(prompts)} prompts, {trace.n_moe_layers} MoE layers, engine {trace.engine}")
    return 0


def profile_engine(model: str, prompts: list[str], max_tokens: int, ctx: int):
    """moe-tier's engine with the recorder as its routing observer, greedy decoding."""
    from moe_tier.engine import Engine

    engine = Engine.open(model, ctx=ctx)
    d, c = engine.desc, engine.desc.config
    recorder = TraceRecorder(fingerprint=d.fingerprint, arch=d.arch, n_layer=c.n_layer, n_expert=c.n_expert,
                             n_expert_used=c.n_expert_used, moe_layers=d.moe_layers, engine="moe-tier")
    for prompt in prompts:
        prompt_ids = engine.tokenize(prompt)
        recorder.begin_sequence(prompt_ids)
        for token in engine.generate_tokens(prompt_ids, max_tokens, observer=recorder):
            recorder.generated(token)
    return recorder.trace()
