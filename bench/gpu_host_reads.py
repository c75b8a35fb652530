"""How fast a kernel reads pinned host memory in place, against a DMA copy of the same bytes.

Decode reads warm experts in place (no copy, no sync); bench/gpu_gemv measured the gemv doing that at half a DMA
copy's rate. Here: the DMA copy; a plain Triton copy kernel reading host memory (contiguous, 16 bytes a thread) at
several tile sizes; the Q4_K gemv in place at several tile sizes. Two Mixtral-sized Q4_K matrices (66 MB).
Usage: python -m bench.gpu_host_reads
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
import triton.language as tl
import triton.testing
from gguf import GGMLQuantizationType as Q

from bench.report import update_section
from moe_tier.kernels.gpu import matrix_bytes
from moe_tier.kernels.gpu_gemv import gemv
from moe_tier.synth.fast import block_pool

D, F = 4096, 14336


@triton.jit
def _copy(base_ptr, src_offset, dst_ptr, n_words, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    src = (base_ptr + src_offset).to(tl.pointer_type(tl.int32), bitcast=True)
    tl.store(dst_ptr + i, tl.load(src + i, mask=i < n_words), mask=i < n_words)


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    dev = torch.device("cuda")
    n_bytes = 2 * matrix_bytes(Q.Q4_K, F, D)
    blocks = torch.from_numpy(block_pool(Q.Q4_K, 0.01, 0, n_bytes)[:n_bytes])
    vram, pinned = blocks.to(dev), blocks.pin_memory()
    dst = torch.empty(n_bytes // 4, dtype=torch.int32, device=dev)
    far = pinned.data_ptr() - vram.data_ptr()
    gb = n_bytes / 1e6
    rows = [("DMA copy (tensor.copy_, pinned -> VRAM)", gb / ms(lambda: vram.copy_(pinned, non_blocking=True)))]
    for block, warps in itertools.product((512, 2048, 8192), (4, 8)):
        run = lambda: _copy[(triton.cdiv(n_bytes // 4, block),)](vram, far, dst, n_bytes // 4, BLOCK=block, num_warps=warps)  # noqa: E731
        run()
        assert torch.equal(dst.view(torch.uint8).cpu(), blocks)
        rows.append((f"Triton copy kernel, {block} words / {warps} warps", gb / ms(run)))
    x = torch.randn(2, D, device=dev)
    offsets = torch.tensor([far, far + n_bytes // 2], dtype=torch.int64, device=dev)
    ref = gemv(x, vram, offsets - far, Q.Q4_K, F, D)
    for block_n, warps, stages in itertools.product((16, 32, 64), (1, 2, 4), (1, 2)):
        tile = dict(block_n=block_n, num_warps=warps, stages=stages)
        got = gemv(x, vram, offsets, Q.Q4_K, F, D, **tile)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3)
        rows.append((f"Q4_K gemv in place, {block_n} rows / {warps} warps / {stages} stages",
                     gb / ms(lambda: gemv(x, vram, offsets, Q.Q4_K, F, D, **tile))))
    body = (f"{torch.cuda.get_device_name(0)}; {n_bytes / 2**20:.0f} MiB of Q4_K blocks in pinned host memory.\n\n"
            "| reader | GB/s |\n| --- | ---: |\n" + "".join(f"| {k} | {r:.1f} |\n" for k, r in rows))
    print(body)
    update_section("Reading pinned host memory from a kernel", "python -m bench.gpu_host_reads " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
