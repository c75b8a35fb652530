"""Do PCIe copies and CPU expert compute add up, or share the host's memory bandwidth?

A hybrid decode (some warm experts computed by the CPU while others cross PCIe into staging slots) only pays if
both can read host memory at full rate at once. Mixtral-shaped Q4_K experts (94 MiB each) in pinned memory,
taken round-robin so that caches do not serve them: (a) pinned host-to-GPU copies alone, (b) one token through
each expert's SwiGLU on the CPU kernels (numba, all cores) alone, (c) both at once for the same time, each in its
own thread.
Usage: python -m bench.host_links [--experts 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from bench.report import update_section
from moe_tier.kernels.gpu import matrix_bytes
from moe_tier.moe import swiglu_ffn
from moe_tier.synth.fast import block_pool
from moe_tier.tensors import QTensor

D, F = 4096, 14336


class Loop(threading.Thread):
    """Runs `once` (which moves n_bytes) until stopped; its rate over the window is bytes / seconds."""

    def __init__(self, once, n_bytes: int):
        super().__init__(daemon=True)
        self.once, self.n_bytes, self.stop, self.count = once, n_bytes, threading.Event(), 0

    def run(self) -> None:
        self.t0 = time.perf_counter()
        while not self.stop.is_set():
            self.once()
            self.count += 1
        self.seconds = time.perf_counter() - self.t0

    def rate(self) -> float:
        return self.count * self.n_bytes / self.seconds / 1e9


def measure(loops: list[Loop], seconds: float) -> list[float]:
    for loop in loops:
        loop.start()
    time.sleep(seconds)
    for loop in loops:
        loop.stop.set()
    for loop in loops:
        loop.join()
    return [loop.rate() for loop in loops]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    mat = matrix_bytes(Q.Q4_K, F, D)
    blob = 3 * mat
    pool = block_pool(Q.Q4_K, 0.01, 0, blob)[:blob]
    pinned = torch.empty(args.experts * blob, dtype=torch.uint8, pin_memory=True)
    host = pinned.numpy()
    for e in range(args.experts):
        host[e * blob : (e + 1) * blob] = pool
    experts = [tuple(QTensor(name, host[e * blob + i * mat : e * blob + (i + 1) * mat], Q.Q4_K, *shape)
                     for i, (name, shape) in enumerate([("gate", (F, D)), ("up", (F, D)), ("down", (D, F))]))
               for e in range(args.experts)]
    vram = torch.empty(blob, dtype=torch.uint8, device="cuda")
    x = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)
    turn = {"gpu": 0, "cpu": 0}

    def copy_one() -> None:
        e = turn["gpu"] = (turn["gpu"] + 1) % args.experts
        vram.copy_(pinned[e * blob : (e + 1) * blob], non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def cpu_one() -> None:
        e = turn["cpu"] = (turn["cpu"] + 1) % args.experts
        swiglu_ffn(x, *experts[e])

    copy_one()
    cpu_one()  # compiles
    alone_gpu = measure([Loop(copy_one, blob)], args.seconds)[0]
    alone_cpu = measure([Loop(cpu_one, blob)], args.seconds)[0]
    both_gpu, both_cpu = measure([Loop(copy_one, blob), Loop(cpu_one, blob)], args.seconds)
    rows = [("pinned host -> GPU copies", alone_gpu, both_gpu),
            (f"CPU SwiGLU, one token ({numba.get_num_threads()} threads)", alone_cpu, both_cpu),
            ("sum", alone_gpu + alone_cpu, both_gpu + both_cpu)]
    body = (f"{torch.cuda.get_device_name(0)}; {args.experts} Mixtral-shaped Q4_K experts ({blob / 2**20:.0f} MiB each) "
            f"in pinned host memory, round-robin, {args.seconds:.0f} s a measurement.\n\n"
            "| reader | alone GB/s | both at once GB/s |\n| --- | ---: | ---: |\n"
            + "".join(f"| {name} | {a:.1f} | {b:.1f} |\n" for name, a, b in rows))
    print(body)
    update_section("Host memory: PCIe copies and CPU experts at once", "python -m bench.host_links " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
