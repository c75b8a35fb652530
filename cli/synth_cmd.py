"""`moe-tier synth OUT`: write a deterministic random GGUF MoE model (tiny for tests, full-size with --fast)."""

from __future__ import annotations

import argparse
import time

from moe_tier.synth import ARCHS, LAYOUTS, PRESETS, preset, write_fast, write_model
from moe_tier.units import format_bytes

# option -> SynthSpec field; unset options keep the preset's value
_SIZES = {
    "layers": "n_layer", "embd": "n_embd", "ff": "n_ff_exp", "experts": "n_expert", "used": "n_expert_used",
    "heads": "n_head", "kv_heads": "n_head_kv", "head_dim": "head_dim", "vocab": "n_vocab",
    "shared_ff": "n_ff_shared", "dense_ff": "n_ff_dense", "dense_layers": "n_leading_dense", "ctx": "n_ctx",
    "seed": "seed",
}


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic GGUF MoE model")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", default="llama", choices=ARCHS, help="GGUF general.architecture (default llama)")
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="starting sizes (default tiny)")
    p.add_argument("--qtype", help="weight type: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 MXFP4 Q2_K..Q6_K IQ4_XS IQ4_NL")
    p.add_argument("--layout", choices=LAYOUTS, help="experts as merged 3-D tensors or one per expert (llama only)")
    p.add_argument("--fast", action="store_true", help="pooled random quant blocks: full-size files in minutes")
    for option in _SIZES:
        p.add_argument(f"--{option.replace('_', '-')}", dest=option, type=int, metavar="N")


def run(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, option) for option, field in _SIZES.items() if getattr(args, option) is not None}
    if args.qtype:
        overrides["qtype"] = args.qtype
    if args.layout:
        overrides["layout"] = args.layout
    spec = preset(args.preset, args.arch, **overrides)
    start = time.perf_counter()
    path = (write_fast if args.fast else write_model)(args.out, spec)
    seconds = time.perf_counter() - start
    print(f"{path} {format_bytes(path.stat().st_size)} {spec.arch} {spec.qtype.name} {spec.layout} ({seconds:.1f} s)")
    return 0
