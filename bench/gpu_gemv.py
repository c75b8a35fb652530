"""Decode's matrix-vector kernel on Mixtral-8x7B-shaped Q4_K experts: tile sweep, and VRAM against pinned host.

One token, top-2, as the decode step launches it: gate and up of both experts in one launch (14336 x 4096 each),
then down (4096 x 14336), timed inside a CUDA graph (triton.testing.do_bench_cudagraph: no launch overhead, as in
the decode graphs), q8_1 quantization of the activations included. Swept: rows a program (block_n), warps, the
program count that split-K aims at (target: it sets the split) and the super-blocks a program loads before their
math (unroll). Then the fastest tile with the activations already q8_1 (as decode passes them: the norm and
silu_mul write that form) and with Triton's software pipelining (num_stages 2), then the grouped tl.dot kernel (kernels/gpu.py)
for comparison, and the fastest tile reading the experts in place from pinned host memory, against a pinned
host-to-device copy of the same bytes. Ceiling: the device-to-device copy rate. The last line names the fastest
tile (gate+up plus down) for the card's entry in gpu_gemv.TILES; each card has its own section.
Usage: python -m bench.gpu_gemv
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton.testing
from gguf import GGMLQuantizationType as Q

from bench.gpu_tiers import d2d_bytes_per_s
from bench.report import update_section
from moe_tier.kernels.gpu import matrix_bytes, moe_matmul
from moe_tier.kernels.gpu_gemv import gemv_parts, gemv_split, tile
from moe_tier.kernels.gpu_q8_1 import quantize_q8_1
from moe_tier.synth.fast import block_pool

D, F = 4096, 14336
SHOWN = 8  # fastest tiles listed, after the module's default


def ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def main() -> None:
    dev = torch.device("cuda")
    n_bytes = matrix_bytes(Q.Q4_K, F, D)
    blob = 3 * n_bytes  # an expert: gate, up, down
    blocks = torch.from_numpy(block_pool(Q.Q4_K, 0.01, 0, 2 * blob)[: 2 * blob])
    vram, pinned = blocks.to(dev), blocks.pin_memory()
    experts = torch.tensor([0, blob], dtype=torch.int64, device=dev)
    x, h = torch.randn(1, D, device=dev), torch.randn(2, F, device=dev)
    d2d = d2d_bytes_per_s() / 1e9
    h2d = 2 * blob / triton.testing.do_bench(lambda: vram.copy_(pinned, non_blocking=True), return_mode="median") / 1e6

    xq_x, xq_h = quantize_q8_1(x), quantize_q8_1(h)

    def run(offsets, bn, warps, target, unroll, quantized=False, stages=1):
        gemv_parts(x, vram, offsets, Q.Q4_K, F, D, (0, n_bytes), x_div=2, block_n=bn, num_warps=warps,
                   split=gemv_split(Q.Q4_K, F, D, 2, 2, bn, target), unroll=unroll, stages=stages,
                   xq=xq_x if quantized else None)
        gemv_parts(h, vram, offsets, Q.Q4_K, D, F, (2 * n_bytes,), block_n=bn, num_warps=warps,
                   split=gemv_split(Q.Q4_K, D, F, 2, 1, bn, target), unroll=unroll, stages=stages,
                   xq=xq_h if quantized else None)

    gb = 2 * blob / 1e6
    swept, seen = [], set()
    for bn, warps, target, unroll in itertools.product((8, 16, 32), (1, 2), (1024, 2048, 4096, 8192), (1, 2)):
        splits = (gemv_split(Q.Q4_K, F, D, 2, 2, bn, target), gemv_split(Q.Q4_K, D, F, 2, 1, bn, target))
        if (bn, warps, splits, unroll) in seen:
            continue
        seen.add((bn, warps, splits, unroll))
        tried = (bn, warps, target, unroll)
        swept.append((gb / ms(lambda tried=tried: run(experts, *tried)), tried, splits))
    bn, warps, target, unroll = tile(dev)  # this card's default (gpu_gemv.TILES)
    default_splits = (gemv_split(Q.Q4_K, F, D, 2, 2, bn, target), gemv_split(Q.Q4_K, D, F, 2, 1, bn, target))
    default = next(r for r in swept if r[1][:2] == (bn, warps) and r[1][3] == unroll and r[2] == default_splits)
    best = max(swept, key=lambda r: r[0])
    shown = [default] + [r for r in sorted(swept, key=lambda r: -r[0]) if r is not default][:SHOWN]
    rows = [((f"gemv block_n {r[1][0]}, warps {r[1][1]}, target {r[1][2]}, unroll {r[1][3]} (splits {r[2][0]}, "
              f"{r[2][1]}){' (default)' if r is default else ''}"), "VRAM", r[0]) for r in shown]
    rows.append(("gemv, fastest tile, activations already q8_1 (as decode)", "VRAM",
                 gb / ms(lambda: run(experts, *best[1], quantized=True))))
    rows.append(("gemv, fastest tile, activations already q8_1, num_stages 2", "VRAM",
                 gb / ms(lambda: run(experts, *best[1], quantized=True, stages=2))))
    seg = torch.tensor([0, 1, 2], dtype=torch.int32, device=dev)
    xx = x.expand(2, D).contiguous()

    def grouped():
        for m in range(2):
            moe_matmul(xx, vram, experts + m * n_bytes, seg, 1, Q.Q4_K, F, D)
        moe_matmul(h, vram, experts + 2 * n_bytes, seg, 1, Q.Q4_K, D, F)

    rows.append(("Q4_K, grouped tl.dot (the prefill kernel)", "VRAM", gb / ms(grouped)))
    # Q4_K_M files keep half the layers' down projections (and the output matrix) in Q6_K: its own kernel.
    q6_bytes = matrix_bytes(Q.Q6_K, D, F)
    q6 = torch.from_numpy(block_pool(Q.Q6_K, 0.01, 0, 2 * q6_bytes)[: 2 * q6_bytes]).to(dev)
    q6_at = torch.tensor([0, q6_bytes], dtype=torch.int64, device=dev)
    q6_gb = 2 * q6_bytes / 1e6
    rows.append(("Q6_K down, gemv (default tile)", "VRAM",
                 q6_gb / ms(lambda: gemv_parts(h, q6, q6_at, Q.Q6_K, D, F, (0,)))))
    rows.append(("Q6_K down, grouped tl.dot (the prefill kernel)", "VRAM",
                 q6_gb / ms(lambda: moe_matmul(h, q6, q6_at, seg, 1, Q.Q6_K, D, F))))
    far = experts + (pinned.data_ptr() - vram.data_ptr())  # the same bytes, read over PCIe in place
    rows.append(("gemv, fastest tile", "pinned host, in place", gb / ms(lambda: run(far, *best[1]))))
    body = (f"{torch.cuda.get_device_name(0)}; two Q4_K experts (gate + up in one launch, then down; "
            f"{2 * blob / 2**20:.0f} MiB), one token, timed in a CUDA graph. Ceilings: device-to-device copy {d2d:.0f} GB/s "
            f"(read + write), pinned host-to-device copy {h2d:.1f} GB/s.\n\n"
            "| kernel | weights in | GB/s of weights |\n| --- | --- | ---: |\n")
    body += "".join(f"| {k} | {w} | {r:.0f} |\n" for k, w, r in rows)
    body += ("\nFastest: rows a program, warps, target programs, unroll = "
             f"{best[1][0]}, {best[1][1]}, {best[1][2]}, {best[1][3]}\n")
    print(body)
    update_section(f"GPU matrix-vector kernel (Q4_K, decode), {torch.cuda.get_device_name(0)}",
                   "python -m bench.gpu_gemv " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
