"""Staging warm experts beside the hot rows' compute, against staging first: one Mixtral-shaped MoE layer.

Decode copies each warm row's expert (99 MiB of Q4_K blocks) from pinned host memory into a staging slot with a
kernel, since only the GPU knows the routing. Staged first, the GPU's HBM idles while PCIe works (~6.6 ms of a
18 ms token at 24 GiB); on a side stream, the copy runs while the hot rows' gate and up read VRAM. The copy
kernel's programs per row set how many SMs it takes from the gemv. 32 layers captured in one CUDA graph, k = 2
rows a token, with 0, 1 or 2 of them warm; results checked equal to the staged-first order.
Usage: python -m bench.gpu_stage_overlap
"""

from __future__ import annotations

import sys

import torch
import triton.testing
from gguf import GGMLQuantizationType as Q

from bench.report import update_section
from moe_tier.kernels.gpu import matrix_bytes
from moe_tier.kernels.gpu_gemv import gemv_parts, gemv_split
from moe_tier.kernels.gpu_moe_decode import combine, locate, silu_mul, stage
from moe_tier.synth.fast import block_pool

D, F, LAYERS, K = 4096, 14336, 32, 2
HOT, WARM = 4, 4  # experts 0..3 in slots, 4..7 in pinned memory


def main() -> None:
    dev = torch.device("cuda")
    mat = matrix_bytes(Q.Q4_K, F, D)
    blob = -(-3 * mat // 256) * 256
    blocks = torch.from_numpy(block_pool(Q.Q4_K, 0.01, 0, 3 * mat)[: 3 * mat])
    arena = torch.zeros((HOT + K) * blob, dtype=torch.uint8, device=dev)
    warm = torch.zeros(WARM * blob, dtype=torch.uint8).pin_memory()
    for e in range(HOT):
        arena[e * blob : e * blob + 3 * mat] = blocks.to(dev)
    for e in range(WARM):
        warm[e * blob : e * blob + 3 * mat] = blocks
    loc = torch.tensor([e * blob for e in range(HOT)] + [warm.data_ptr() - arena.data_ptr() + e * blob
                                                         for e in range(WARM)], dtype=torch.int64, device=dev)
    x = torch.randn(1, D, device=dev)
    weights = torch.full((1, K), 0.5, device=dev)
    side = torch.cuda.Stream(dev)
    split = gemv_split(Q.Q4_K, F, D, K, 2)

    def layer(ids, overlap, programs):
        now, late, every = locate(ids, loc, 0, arena, HOT * blob, K, blob)
        buf = torch.empty((2, 2 * split, K, F), device=dev)
        if overlap:
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                stage(ids, loc, 0, arena, late, 3 * mat, programs)
            gemv_parts(x, arena, now, Q.Q4_K, F, D, (0, mat), x_div=K, out=buf[:, :split])
            main.wait_stream(side)
            gemv_parts(x, arena, late, Q.Q4_K, F, D, (0, mat), x_div=K, out=buf[:, split:])
        else:
            stage(ids, loc, 0, arena, late, 3 * mat, programs)
            buf[:, split:].zero_()
            gemv_parts(x, arena, every, Q.Q4_K, F, D, (0, mat), x_div=K, out=buf[:, :split])
        h, hq = silu_mul(buf)
        down = gemv_parts(h, arena, every, Q.Q4_K, D, F, (2 * mat,), xq=hq)[0]
        return combine(down, weights)

    def captured(ids, overlap, programs):
        layer(ids, overlap, programs)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = [layer(ids, overlap, programs) for _ in range(LAYERS)]
        return graph, out[-1]

    rows = []
    for warm_rows, chosen in [(0, [0, 1]), (1, [0, HOT]), (2, [HOT, HOT + 1])]:
        ids = torch.tensor(chosen, dtype=torch.int32, device=dev)
        base, base_out = captured(ids, False, 512)
        base_ms = triton.testing.do_bench(base.replay, warmup=3, rep=30, return_mode="median") / LAYERS
        row = [f"{warm_rows} of {K}", f"{base_ms:.3f}"]
        for programs in (16, 32, 64, 128, 512):
            graph, out = captured(ids, True, programs)
            graph.replay()
            torch.testing.assert_close(out, base_out, rtol=1e-4, atol=1e-4)
            row.append(f"{triton.testing.do_bench(graph.replay, warmup=3, rep=30, return_mode='median') / LAYERS:.3f}")
        rows.append(row)
    body = (f"{torch.cuda.get_device_name(0)}; ms per layer (32 layers in one CUDA graph), one token, k = {K}, "
            f"experts {blob / 2**20:.0f} MiB of Q4_K blocks.\n\n"
            "| warm rows | staged first (512 programs/row) | beside, 16 | 32 | 64 | 128 | 512 programs/row |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "".join(f"| {' | '.join(r)} |\n" for r in rows))
    print(body)
    update_section("Staging warm experts beside compute", "python -m bench.gpu_stage_overlap " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
