"""Decode's matrix-vector kernel on Mixtral-8x7B-shaped Q4_K experts: from VRAM slots and from pinned host memory.

Two experts (one token, top-2), gate (14336 x 4096) and down (4096 x 14336), timed with triton.testing.do_bench:
the grouped tl.dot kernel (kernels/gpu.py) against the matrix-vector kernel (kernels/gpu_gemv.py) over a sweep of
tile sizes, warps and split-K parts (the default, then the fastest), then the matrix-vector kernel reading the experts in place from pinned host memory (the warm tier at
decode), against a pinned host-to-device copy of the same bytes. Ceilings: the device-to-device copy rate.
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
from moe_tier.kernels.gpu_gemv import BLOCK_N, NUM_WARPS, gemv
from moe_tier.synth.fast import block_pool

D, F = 4096, 14336
SHAPES = {"gate 14336x4096": (F, D), "down 4096x14336": (D, F)}
SHOWN = 6  # fastest tiles listed per matrix, after the module's default


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    dev = torch.device("cuda")
    n_bytes = matrix_bytes(Q.Q4_K, F, D)
    blocks = torch.from_numpy(block_pool(Q.Q4_K, 0.01, 0, 2 * n_bytes)[: 2 * n_bytes])
    vram, pinned = blocks.to(dev), blocks.pin_memory()
    offsets = torch.tensor([0, n_bytes], dtype=torch.int64, device=dev)
    d2d = d2d_bytes_per_s() / 1e9
    h2d = 2 * n_bytes / ms(lambda: vram.copy_(pinned, non_blocking=True)) / 1e6
    rows = []
    for name, (n_rows, n_cols) in SHAPES.items():
        x = torch.randn(2, n_cols, device=dev)
        seg = torch.tensor([0, 1, 2], dtype=torch.int32, device=dev)
        gb = 2 * n_bytes / 1e6
        ref = moe_matmul(x, vram, offsets, seg, 1, Q.Q4_K, n_rows, n_cols)
        rows.append((name, "grouped tl.dot (before)", "VRAM", gb / ms(lambda: moe_matmul(x, vram, offsets, seg, 1, Q.Q4_K, n_rows, n_cols))))
        swept = []
        for block_n, warps, split in itertools.product((8, 16, 32), (1, 2, 4), (None, 2, 4, 8)):
            tile = dict(block_n=block_n, num_warps=warps, split=split)
            got = gemv(x, vram, offsets, Q.Q4_K, n_rows, n_cols, **tile)
            err = float((got - ref).norm() / ref.norm())
            rate = gb / ms(lambda: gemv(x, vram, offsets, Q.Q4_K, n_rows, n_cols, **tile))
            swept.append((rate, err, tile))
        default = next(r for r in swept if r[2] == dict(block_n=BLOCK_N, num_warps=NUM_WARPS, split=None))
        for rate, err, tile in [default] + [r for r in sorted(swept, key=lambda r: -r[0]) if r is not default][:SHOWN]:
            label = ", ".join(f"{k} {'auto' if v is None else v}" for k, v in tile.items())
            rows.append((name, f"gemv {label}{' (default)' if tile == default[2] else ''} (rel diff {err:.1e})", "VRAM", rate))
        best = max(swept, key=lambda r: r[0])
        tile = best[2]
        far = offsets + (pinned.data_ptr() - vram.data_ptr())  # the same bytes, read over PCIe in place
        got = gemv(x, vram, far, Q.Q4_K, n_rows, n_cols, **tile)
        err = float((got - ref).norm() / ref.norm())
        rows.append((name, f"gemv {tile} (rel diff {err:.1e})", "pinned host, in place",
                     gb / ms(lambda: gemv(x, vram, far, Q.Q4_K, n_rows, n_cols, **tile))))
    body = (f"{torch.cuda.get_device_name(0)}; two Q4_K experts' matrices ({2 * n_bytes / 2**20:.0f} MiB), one token each. "
            f"Ceilings: device-to-device copy {d2d:.0f} GB/s (read + write), pinned host-to-device copy {h2d:.1f} GB/s.\n\n"
            "| matrix | kernel | weights in | GB/s of weights |\n| --- | --- | --- | ---: |\n")
    body += "".join(f"| {m} | {k} | {w} | {r:.0f} |\n" for m, k, w, r in rows)
    print(body)
    update_section("GPU matrix-vector kernel (Q4_K, decode)", "python -m bench.gpu_gemv " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
