"""CPU matmul kernels vs llama.cpp's CPU backend: weight GB/s at T = 1 on 4096 x 14336 shapes.

Both run in this process on the same random weights: ours through moe_tier.kernels.matmul, llama.cpp through
its ggml libraries (built from the vendored sources with GGML_NATIVE=ON) called with ctypes: a graph of
REPEATS independent MUL_MAT nodes computed with ggml_graph_compute_with_ctx, so the per-graph thread start is
amortised. Timings are the best of ROUNDS, alternating ours and llama.cpp so a busy machine hurts both alike.
The two results are also compared: same activation quantization, so they agree to float rounding.

Build llama.cpp once (several minutes):
  cmake -S /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/llama-build --target test-backend-ops -j2
Run:  python -m bench.cpu_kernels [--ggml-lib-dir /tmp/llama-build/bin] [--no-record]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from bench.report import update_section
from moe_tier import kernels

SHAPES = ((14336, 4096), (4096, 14336))  # (N rows, K cols): ffn up/gate and down of a 4096-wide model
# Q4_K_M files are Q4_K with some Q6_K, Q5_K_M Q5_K and Q6_K; Q2_K / Q3_K_M (the largest MoE models) Q2_K..Q5_K
TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q8_0)
REPEATS = 4  # MUL_MAT nodes per ggml graph
ROUNDS = 30  # best of: on a shared 2-core machine a calm window for both sides needs many tries
# fp16 scale fields per block (ggml-common.h); all other bytes may be random.
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,)}


class Ggml:
    """The few ggml entry points a MUL_MAT graph needs (ggml.h, ggml-cpu.h)."""

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self, lib_dir: Path):
        mode = ctypes.RTLD_GLOBAL
        self.base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=mode)
        self.cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=mode)
        p = ctypes.c_void_p
        for name, res, args in [
            ("ggml_init", p, [Ggml.InitParams]), ("ggml_free", None, [p]),
            ("ggml_new_tensor_2d", p, [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            ("ggml_mul_mat", p, [p, p, p]), ("ggml_new_graph", p, [p]),
            ("ggml_build_forward_expand", None, [p, p]), ("ggml_get_data", p, [p]),
            ("ggml_nbytes", ctypes.c_size_t, [p]),
            ("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, p, p, ctypes.c_int64, ctypes.c_int64,
                                                      ctypes.c_int64, p]),
        ]:
            fn = getattr(self.base, name)
            fn.restype, fn.argtypes = res, args
        self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
        self.cpu.ggml_cpu_init()

    def quantize(self, data: np.ndarray, qtype: Q) -> np.ndarray:
        """llama.cpp's own quantizer (ggml_quantize_chunk): (N, K) float32 -> (N, row_bytes) uint8."""
        n_rows, n_cols = data.shape
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        out = np.zeros((n_rows, n_cols // block_values * block_bytes), np.uint8)
        data = np.ascontiguousarray(data, dtype=np.float32)
        self.base.ggml_quantize_chunk(int(qtype), data.ctypes.data, out.ctypes.data, 0, n_rows, n_cols, None)
        return out

    def matmul_runner(self, w: np.ndarray, qtype: Q, n_rows: int, x: np.ndarray):
        """Returns (run(n_threads) -> seconds per MUL_MAT, result() (T, N) of the last node, free())."""
        n_tok, n_cols = x.shape
        ctx = self.base.ggml_init(Ggml.InitParams(w.nbytes + (256 << 20), None, False))
        wt = self.base.ggml_new_tensor_2d(ctx, int(qtype), n_cols, n_rows)
        xt = self.base.ggml_new_tensor_2d(ctx, int(Q.F32), n_cols, n_tok)
        assert self.base.ggml_nbytes(wt) == w.nbytes
        ctypes.memmove(self.base.ggml_get_data(wt), w.ctypes.data, w.nbytes)
        ctypes.memmove(self.base.ggml_get_data(xt), x.ctypes.data, x.nbytes)
        graph = self.base.ggml_new_graph(ctx)
        outs = [self.base.ggml_mul_mat(ctx, wt, xt) for _ in range(REPEATS)]
        for out in outs:
            self.base.ggml_build_forward_expand(graph, out)

        def run(n_threads: int) -> tuple[float, float]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            assert self.cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
            return (time.perf_counter() - start) / REPEATS, (time.thread_time() - start_cpu) / REPEATS

        def result() -> np.ndarray:
            buf = (ctypes.c_float * (n_tok * n_rows)).from_address(self.base.ggml_get_data(outs[-1]))
            return np.frombuffer(buf, dtype=np.float32).reshape(n_tok, n_rows).copy()

        return run, result, lambda: self.base.ggml_free(ctx)


def random_weight(qtype: Q, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_rows, n_cols // block_values, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(0.002, 0.02, (n_rows, n_cols // block_values, 1)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8)
    return blocks.reshape(n_rows, -1)


def parity_table(ggml: Ggml, rng: np.random.Generator) -> str:
    """Every supported type, weights quantized by llama.cpp itself: max |ours - llama.cpp| / max |llama.cpp|."""
    n_rows, n_cols = 64, 1024
    lines = ["| type | T=1 | T=5 |", "|---|---|---|"]
    for qtype in sorted(kernels.SUPPORTED, key=lambda q: q.name):
        w = ggml.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), qtype)
        diffs = []
        for n_tok in (1, 5):
            x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
            run, result, free = ggml.matmul_runner(w, qtype, n_rows, x)
            run(1)  # (wall, cpu) ignored: only the result matters here
            theirs = result()
            free()
            ours = kernels.matmul(x, w, qtype, n_rows, n_cols)
            diffs.append(float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
        lines.append(f"| {qtype.name} | {diffs[0]:.1e} | {diffs[1]:.1e} |")
    return "\n".join(lines) + "\n"


def ours_seconds(w: np.ndarray, qtype: Q, n_rows: int, x: np.ndarray) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one matmul."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    kernels.matmul(x, w, qtype, n_rows, x.shape[1])
    return time.perf_counter() - start, time.thread_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ggml-lib-dir", type=Path, default=Path("/tmp/llama-build/bin"))
    parser.add_argument("--no-record", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    ggml = Ggml(args.ggml_lib_dir)
    load_at_start = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    rows = []
    for qtype in TYPES:
        for n_rows, n_cols in SHAPES:
            w = random_weight(qtype, n_rows, n_cols, rng)
            x = rng.standard_normal((1, n_cols)).astype(np.float32)
            run_llama, llama_result, free = ggml.matmul_runner(w, qtype, n_rows, x)
            for n_threads in thread_counts:
                numba.set_num_threads(n_threads)
                ours_seconds(w, qtype, n_rows, x)  # compile / warm up both
                run_llama(n_threads)
                ours_best = llama_best = ours_cpu = llama_cpu = float("inf")
                for _ in range(ROUNDS):
                    wall, cpu = ours_seconds(w, qtype, n_rows, x)
                    ours_best, ours_cpu = min(ours_best, wall), min(ours_cpu, cpu)
                    wall, cpu = run_llama(n_threads)
                    llama_best, llama_cpu = min(llama_best, wall), min(llama_cpu, cpu)
                ours = kernels.matmul(x, w, qtype, n_rows, n_cols)
                theirs = llama_result()
                rel_diff = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
                ours_gbs, llama_gbs = w.nbytes / ours_best / 1e9, w.nbytes / llama_best / 1e9
                # one thread computes on the calling thread in both: its CPU time ignores time preempted
                cpu_ratio = f"{llama_cpu / ours_cpu:.2f}" if n_threads == 1 else "-"
                rows.append((qtype.name, f"{n_cols}x{n_rows}", n_threads, ours_best * 1e3, ours_gbs,
                             llama_best * 1e3, llama_gbs, ours_gbs / llama_gbs, cpu_ratio, rel_diff))
                print(*rows[-1], flush=True)
            free()
    header = ("| type | K x N | threads | ours ms | ours GB/s | llama.cpp ms | llama.cpp GB/s | ratio | "
              "ratio (CPU time) | max rel diff |\n|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {t} | {s} | {n} | {om:.2f} | {og:.2f} | {lm:.2f} | {lg:.2f} | {r:.2f} | {c} | {d:.1e} |\n"
        for t, s, n, om, og, lm, lg, r, c, d in rows
    )
    notes = (
        f"\nT = 1 token, weights {', '.join(t.name for t in TYPES)} as random valid blocks; GB/s = weight bytes / "
        f"time, best of {ROUNDS} alternating rounds; ratio (CPU time): the same from the calling thread's CPU "
        "time, 1 thread only, robust to other processes preempting. llama.cpp: ggml CPU backend from the vendored "
        "sources "
        f"(GGML_NATIVE=ON), {REPEATS} MUL_MAT nodes per graph_compute. ratio = ours / llama.cpp. "
        "max rel diff = max |ours - llama.cpp| / max |llama.cpp| on the same inputs. "
        f"1-minute load average at start: {load_at_start:.1f} on {all_threads} cores (a shared machine: "
        "absolute numbers move from run to run, the ratios much less).\n"
    )
    parity = parity_table(ggml, rng)
    print(table)
    print(parity)
    parity_notes = (
        "\nParity: 64 x 1024 weights quantized by llama.cpp (ggml_quantize_chunk), same x, "
        "max |ours - llama.cpp| / max |llama.cpp| per type.\n\n"
    )
    if not args.no_record:
        update_section("CPU kernels", "python -m bench.cpu_kernels", table + notes + parity_notes + parity)


if __name__ == "__main__":
    main()
