"""GPU tiers on one GPU: the links measured at start-up, expert fetch times, and the grouped Triton kernel on
Mixtral-8x7B-shaped experts (4096 x 14336), against the card's device-to-device copy rate as the ceiling.

A two-layer Mixtral-shaped file (16 experts) is written with the fast synthetic writer; layer 0's experts are
hot, four of layer 1's warm, the rest cold. No peer here: llama.cpp's CUDA build is compared in a later bench.
Usage: python -m bench.gpu_tiers [--qtype Q4_K] [--out /tmp/bench-gpu.gguf] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import triton.testing

from bench.report import update_section
from moe_tier.config import Gating
from moe_tier.kernels.gpu import DEQUANT_MIN_ROWS, matmul_dequantized, moe_matmul
from moe_tier.moe import route
from moe_tier.host_tiers import blob_layout
from moe_tier.moe_gpu import moe_ffn_gpu
from moe_tier.plan import GpuPlan, TierPlan
from moe_tier.reader import open_model
from moe_tier.stats import EngineStats
from moe_tier.synth import mixtral_8x7b, write_fast
from moe_tier.tensors import matrix_dims
from moe_tier.tiers.gpu_pool import GpuTiers


def d2d_bytes_per_s(n_bytes: int = 1 << 30) -> float:
    """Read + written bytes per second of a large device copy: the memory-bound ceiling."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n_bytes / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-gpu.gguf"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    desc = open_model(write_fast(args.out, mixtral_8x7b(n_layer=2, qtype=args.qtype)))
    write_s = time.perf_counter() - t0
    experts = list(desc.experts)
    layer0, layer1 = experts[:8], experts[8:]
    slot_bytes = max(r.n_bytes for r in desc.experts.values())
    gpu = GpuPlan(0, torch.cuda.get_device_name(0), 0, 0, True, 0, 0, 0, (0, 1), slot_bytes, 10)
    plan = TierPlan((gpu,), {e: 0 for e in layer0}, tuple(layer1[:4]), tuple(layer1[4:]), 0, 0, 0, "uniform")
    stats = EngineStats()
    t0 = time.perf_counter()
    tiers = GpuTiers(desc, plan, stats)
    open_s = time.perf_counter() - t0
    rows = [("expert bytes", f"{slot_bytes / 2**20:.1f} MiB"), ("file write / tiers open", f"{write_s:.1f} s / {open_s:.1f} s")]
    rows += [(k.replace("_", " "), f"{v:.2f}") for k, v in tiers.speeds.as_gb_per_s().items()]
    ceiling = d2d_bytes_per_s()
    rows.append(("device copy GB/s (read+write)", f"{ceiling / 1e9:.0f}"))

    for name, eid in (("warm", layer1[0]), ("cold", layer1[5])):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tiers.fetch([eid], 0, protected=frozenset(layer0))
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append((f"fetch one {name} expert", f"{s * 1e3:.1f} ms ({slot_bytes / s / 1e9:.1f} GB/s)"))

    dev = tiers.arena[0].device
    for matrix, n_tokens, n_experts in (("gate", 1, 2), ("down", 1, 2), ("gate", 8, 8), ("gate", 64, 8), ("gate", 512, 8)):
        part = desc.experts[layer0[0]].part(matrix)
        n_rows, n_cols = matrix_dims(part.shape)
        used = layer0[:n_experts]
        at = blob_layout(desc.experts[used[0]])[matrix]
        offsets = torch.tensor([tiers.blob_offset(e)[1] + at for e in used], dtype=torch.int64, device=dev)
        counts = np.full(n_experts, n_tokens * 2 // n_experts or 1)
        seg = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32, device=dev)
        x = torch.randn(int(counts.sum()), n_cols, device=dev)
        read = n_experts * part.n_bytes
        tiles = [(16, 32, 4), (16, 64, 4), (16, 64, 8), (16, 128, 4), (16, 128, 8)]
        if n_tokens >= 64:  # prefill: wider token tiles decode each weight tile for more tokens
            tiles += [(32, 64, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 128, 8)]
        # Slots are 16-byte aligned: Q4_K / Q5_K quants read as words (aligned); the first tile also byte-wise.
        for (block_t, block_n, num_warps), aligned in [(tiles[0], False)] + [(t, True) for t in tiles]:
            ms = triton.testing.do_bench(
                lambda: moe_matmul(x, tiers.arena[0], offsets, seg, int(counts.max()), part.qtype, n_rows, n_cols,
                                   block_n=block_n, num_warps=num_warps, block_t=block_t, aligned=aligned),  # noqa: B023
                warmup=25, rep=100, return_mode="median")
            rows.append((f"{matrix} T={n_tokens}, {n_experts} experts, block_t {block_t}, block_n {block_n}, {num_warps} warps"
                         f"{', words' if aligned else ', bytes'}",
                         f"{ms:.3f} ms, {read / ms / 1e6:.0f} GB/s ({read / ms / 1e6 / (ceiling / 2e9):.0%} of copy read rate)"))
        if counts.max() >= DEQUANT_MIN_ROWS:  # what prefill runs at this size: float16 chunks through cuBLAS
            at, per = offsets.tolist(), np.concatenate([[0], np.cumsum(counts)])

            def dequantized():
                for i, a in enumerate(at):
                    matmul_dequantized(x[per[i] : per[i + 1]], tiers.arena[0], a, part.qtype, n_rows, n_cols)  # noqa: B023

            ms = triton.testing.do_bench(dequantized, warmup=10, rep=50, return_mode="median")
            flops = 2 * int(counts.sum()) * n_rows * n_cols
            rows.append((f"{matrix} T={n_tokens}, {n_experts} experts, float16 chunks + cuBLAS",
                         f"{ms:.3f} ms, {read / ms / 1e6:.0f} GB/s, {flops / ms / 1e9:.0f} TFLOP/s"))

    rng = np.random.default_rng(0)
    for n_tokens in (1, 16, 512):
        logits = rng.standard_normal((n_tokens, 8)).astype(np.float32)
        routing = route(logits, 2, Gating.SOFTMAX, weights_norm=True)
        x = torch.randn(n_tokens, desc.config.n_embd, device=dev)
        ms = triton.testing.do_bench(lambda: moe_ffn_gpu(x, routing, 0, tiers), warmup=10, rep=50, return_mode="median")
        rows.append((f"MoE layer, all hot, T={n_tokens}", f"{ms:.2f} ms"))
    tiers.check()
    tiers.close()

    body = "| what | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    if args.markdown:
        args.markdown.write_text(body)
    update_section("gpu-tiers", f"python -m bench.gpu_tiers --qtype {args.qtype}", body)
    print(body)


if __name__ == "__main__":
    main()
