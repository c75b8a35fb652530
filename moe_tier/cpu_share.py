"""The CPU's share of the experts decode stages: while the GPU copies and computes most of a warm expert, the CPU
computes the rest from the same pinned bytes, so the link's and the CPU's memory bandwidth add up.

Shape key: R rows (token x chosen expert), T tokens, D embedding width, F expert FFN width, f the cut.
An expert is cut at row f of gate and up (a multiple of CUT_VALUES): the CPU computes silu(gate) * up of rows
[0, f), the GPU rows [f, F), then down over all F with the CPU's f values in front of its own. The GPU's bytes are
then three contiguous ranges of the blob (gate's and up's later rows, all of down), which the copy engine moves at
the link's full rate (a column range of every row of down, which an earlier cut gave the GPU, moved at ~38 GB/s
against 55 on an H200 host). Each layer's f is set once, from the rates measured at start-up: the CPU reads f rows
of gate and up while the link moves the rest, so both finish together.

Hand-off without the host in the stream: for each layer (and GPU) the step's locate kernel publishes its staged
rows' experts, their staging slots and its input to pinned memory, then a flag word; the host polls the flag, queues
copies of the GPU's part of those experts on a copy stream (the copy engine; a flag in VRAM follows them, which a
kernel in the stream spins on before the staged rows compute), computes its own part, writes its rows and then its
own flag, on which silu_mul spins before it reads those rows for the down projection (kernels/gpu_moe_decode.py). A step thus stays one
CUDA graph: the host serves the step's points in order after queuing it (DecodeGraphs.step), or inline (eager
steps). A point's buffers live as long as this object: captured graphs hold their addresses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from moe_tier import kernels
from moe_tier.copy_engine import CopyEngine
from moe_tier.host_tiers import blob_layout
from moe_tier.kernels.activations import Activations
from moe_tier.kernels.gpu_gemv import KERNELS
from moe_tier.kernels.gpu_moe_decode import HostRows, Publish, await_staged
from moe_tier.layers import silu
from moe_tier.moe_gpu import aligned
from moe_tier.reader import ExpertId, ExpertRef
from moe_tier.tensors import matrix_dims

# The cut is a multiple of this many rows of gate and up: the host's values and the GPU's then fill whole q8_1
# blocks of the down projection's input (silu_mul quantizes them together).
CUT_VALUES = 512
POLL_TIMEOUT_S = 60.0  # a GPU that has not published by then has failed; the host stops waiting


def side_by_side(tiers, share: float, n_experts: int = 8, repeats: int = 3) -> tuple[float, float] | None:
    """(CPU, link) bytes per second measured at once, as decode runs them: the CPU computing its part of some warm
    experts at `share` while the link copies host memory to the GPU. Both read the host's RAM: on an H200 host the
    CPU part ran at 43 GB/s at decode against the 64 measured alone, so the plain rates' share left the GPU
    waiting. None where no expert is warm or no layer can be cut."""
    cuts = plan_cuts(tiers.desc.experts, share)
    sample = [eid for eid in tiers.warm.offset if eid not in tiers.table.slot_of and eid.layer in cuts][:n_experts]
    if not sample:
        return None
    probe = CpuShare(tiers, cuts)
    x = np.random.default_rng(0).standard_normal(tiers.desc.config.n_embd).astype(np.float32)
    for eid in sample:  # compiled and warm
        probe.compute(eid, x)
    cpu_bytes = repeats * sum(cuts[eid.layer].cpu_bytes for eid in sample)
    device = next(iter(tiers.arena.values())).device
    chunk = 64 << 20
    n_copies = max(2, int(cpu_bytes / tiers.speeds.cpu_bytes_per_s * tiers.speeds.h2d_bytes_per_s) // chunk + 1)
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    src.numpy()[:] = 1
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for _ in range(n_copies):  # queued at once: they run while the CPU computes below
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for eid in sample:
            probe.compute(eid, x)
    cpu_s = time.perf_counter() - t0
    end.synchronize()  # start-up measurement: waiting here is the point
    link_s = start.elapsed_time(end) / 1e3
    return cpu_bytes / cpu_s, n_copies * chunk / link_s


@dataclass(frozen=True)
class Cut:
    """One layer's experts cut at row `rows` of gate and up: the CPU computes silu(gate) * up of rows [0, f), the
    GPU rows [f, F) and then down over all F (so the GPU's bytes are three contiguous ranges of a blob)."""
    rows: int
    n_ff: int
    gate_up_at: dict[str, int]  # gate and up rows [f, F): their offsets in a blob
    cpu_bytes: int  # blob bytes the CPU reads for one expert
    n_bytes: int  # a blob's bytes
    spans: list[tuple[int, int]]  # the GPU's bytes in a blob: (offset, bytes)


def plan_cut(ref: ExpertRef, share: float) -> Cut | None:
    """The layer's cut for a CPU share of its bytes (at most gate's and up's, less one CUT_VALUES of rows), or
    None where it cannot be cut (a type without a GPU matrix-vector kernel, a bias, misaligned rows, or a share
    under one CUT_VALUES of rows)."""
    if {p.matrix for p in ref.parts} != {"gate", "up", "down"} or any(p.qtype not in KERNELS for p in ref.parts):
        return None
    at = blob_layout(ref)
    gate, up, down = (ref.part(m) for m in ("gate", "up", "down"))
    n_ff, n_embd = matrix_dims(gate.shape)
    row = {m: kernels.row_bytes(p.qtype, n_embd) for m, p in (("gate", gate), ("up", up))}
    rows = min(int(share * ref.n_bytes / (row["gate"] + row["up"])), n_ff - CUT_VALUES) // CUT_VALUES * CUT_VALUES
    gate_up_at = {m: at[m] + rows * row[m] for m in ("gate", "up")}
    if rows < CUT_VALUES or not aligned(gate_up_at.values()):
        return None
    spans = [(gate_up_at[m], (n_ff - rows) * row[m]) for m in ("gate", "up")] + [(at["down"], down.n_bytes)]
    return Cut(rows, n_ff, gate_up_at, rows * (row["gate"] + row["up"]), ref.n_bytes, spans)


def plan_cuts(experts: dict[ExpertId, ExpertRef], share: float) -> dict[int, Cut]:
    """Each layer's cut (its experts share one layout: the device path requires it), where it has one."""
    first = {}
    for eid, ref in experts.items():
        first.setdefault(eid.layer, ref)
    cuts = {layer: plan_cut(ref, share) for layer, ref in first.items()} if share > 0 else {}
    return {layer: cut for layer, cut in cuts.items() if cut is not None}


@dataclass
class Point:
    """One layer's hand-off on one GPU: pinned buffers and their offsets from the GPU's slot arena."""
    layer: int
    gpu: int
    flag_in: torch.Tensor  # (1,) int32: the step whose rows are published
    ids: torch.Tensor  # (R,) int32: each row's expert where staged, else -1
    late: torch.Tensor  # (R,) int64: each row's staging offset (from the GPU's slot arena) or SKIP
    x: torch.Tensor  # (T, D) float32
    flag_out: torch.Tensor  # (1,) int32: the step whose CPU rows are written
    out: torch.Tensor  # (R, f) float32: the CPU's silu(gate) * up of each staged row
    seq: torch.Tensor  # (1,) int32: the step number copied to `staged` after the staged rows
    staged: torch.Tensor  # (1,) int32 in VRAM, which the stream waits on before reading the staged rows
    at: dict[str, int]


class CpuShare:
    def __init__(self, tiers, cuts: dict[int, Cut]):
        self.tiers, self.cuts = tiers, cuts  # tiers.stats is read at each use: a benchmark may replace it
        self.warm, self.experts, self.arenas = tiers.warm, tiers.desc.experts, tiers.arena
        self.host = self.warm.arena.numpy()  # the pinned blobs, which the CPU kernels read in place
        # the GPU's part of a staged expert moves by the copy engine, on a stream of its own per GPU
        self.copies = {g: CopyEngine(a.device) for g, a in self.arenas.items()}
        self.seq = 0
        self.seq_dev = {g: torch.zeros(1, dtype=torch.int32, device=a.device) for g, a in self.arenas.items()}
        self.points: dict[tuple, Point] = {}  # (layer, GPU, R, T) -> its buffers
        self.step: list[Point] = []  # this step's points in the order queued

    def fraction(self) -> float:
        """The CPU's share of a staged expert's bytes, over the layers it takes part in."""
        return sum(c.cpu_bytes for c in self.cuts.values()) / sum(c.n_bytes for c in self.cuts.values())

    def begin_step(self) -> None:
        """A new step number on every GPU (queued: the step's kernels read it when they run)."""
        self.seq += 1
        for t in self.seq_dev.values():
            t.fill_(self.seq)
        self.step = []

    def publish(self, gpu: int, layer: int, n_rows: int, x: torch.Tensor) -> tuple[Point, Publish]:
        """The layer's point of this step, and where locate publishes its staged rows for the host."""
        key = (layer, gpu, n_rows, len(x))
        if key not in self.points:
            self.points[key] = self._point(gpu, layer, n_rows, x.shape, self.cuts[layer].rows)
        p = self.points[key]
        self.step.append(p)
        return p, Publish(x.float().contiguous(), self.arenas[gpu], p.at["flag_in"], p.at["ids"], p.at["late"], p.at["x"],
                          self.seq_dev[gpu])

    def await_staged(self, p: Point, late: torch.Tensor) -> None:
        """The stream waits for the copy engine's part of the staged rows (queued by the host in serve)."""
        await_staged(late, p.staged, self.seq_dev[p.gpu])

    def rows(self, p: Point, late: torch.Tensor) -> HostRows:
        """The host's rows of the point's staged rows, for silu_mul to wait for and read."""
        return HostRows(late, self.arenas[p.gpu], p.at["flag_out"], p.at["out"], self.seq_dev[p.gpu],
                        self.cuts[p.layer].rows)

    def _point(self, gpu: int, layer: int, R: int, x_shape, f: int) -> Point:
        bufs = dict(flag_in=torch.zeros(1, dtype=torch.int32), ids=torch.zeros(R, dtype=torch.int32),
                    late=torch.zeros(R, dtype=torch.int64), x=torch.zeros(tuple(x_shape), dtype=torch.float32),
                    flag_out=torch.zeros(1, dtype=torch.int32), out=torch.zeros((R, f), dtype=torch.float32),
                    seq=torch.zeros(1, dtype=torch.int32))
        bufs = {name: t.pin_memory() for name, t in bufs.items()}
        base = self.arenas[gpu].data_ptr()
        at = {name: t.data_ptr() - base for name, t in bufs.items()}
        return Point(layer, gpu, **bufs, staged=torch.zeros(1, dtype=torch.int32, device=self.arenas[gpu].device), at=at)

    def serve(self, points: list[Point]) -> None:
        """Wait for each point's rows in turn and compute the CPU's part of them. Should one fail, every later
        flag is still raised, so that no kernel spins for ever, and the error goes on."""
        for i, p in enumerate(points):
            try:
                self._serve(p)
            except BaseException:
                for q in points[i:]:
                    q.flag_out.numpy()[0] = self.seq
                    self._raise_staged(q)
                raise

    def _serve(self, p: Point) -> None:
        flag_in = p.flag_in.numpy()
        t0 = time.perf_counter()
        while flag_in[0] != self.seq:  # the GPU's store lands in pinned memory; numpy reads it afresh
            if time.perf_counter() - t0 > POLL_TIMEOUT_S:
                raise RuntimeError(f"layer {p.layer}: the GPU did not publish its rows in {POLL_TIMEOUT_S:.0f} s")
        t1 = time.perf_counter()
        self.tiers.stats.waited("cpu share: waiting for the GPU", t1 - t0)
        ids = p.ids.numpy()
        if (ids >= 0).any():
            self._stage(p, ids)
            out, x = p.out.numpy(), p.x.numpy()
            k = len(ids) // len(x)
            for r, e in enumerate(ids.tolist()):
                if e >= 0:
                    out[r] = self.compute(ExpertId(p.layer, e), x[r // k])
            self.tiers.stats.waited("cpu share: computing", time.perf_counter() - t1)
        p.flag_out.numpy()[0] = self.seq  # after the rows: x86 stores are seen in order

    def _stage(self, p: Point, ids: np.ndarray) -> None:
        """Queue copies of the GPU's part of each staged row's expert into its staging slot, then the flag that
        await_staged waits on: the copy engine moves them while the CPU computes its part (a kernel copying them
        took SMs from the matrix-vector products beside it)."""
        arena, warm, late = self.arenas[p.gpu].data_ptr(), self.warm.arena.data_ptr(), p.late.numpy()
        spans = self.cuts[p.layer].spans
        self.copies[p.gpu].copy([(arena + int(late[r]) + at, warm + self.warm.offset[ExpertId(p.layer, e)] + at, n)
                                 for r, e in enumerate(ids.tolist()) if e >= 0 for at, n in spans])
        self._raise_staged(p)

    def _raise_staged(self, p: Point) -> None:
        p.seq.numpy()[0] = self.seq  # read by the copy below when it runs: the next write is a step later
        self.copies[p.gpu].copy([(p.staged.data_ptr(), p.seq.data_ptr(), p.staged.element_size())])

    def compute(self, eid: ExpertId, x: np.ndarray) -> np.ndarray:
        """(f,): silu(gate) * up of rows [0, f) of the expert's pinned blob, for input x (D,)."""
        ref, cut = self.experts[eid], self.cuts[eid.layer]
        at, blob = blob_layout(ref), self.host[self.warm.offset[eid] :]
        n_embd = matrix_dims(ref.part("gate").shape)[1]
        acts = Activations(x[None])
        gate, up = (kernels.matmul(acts, blob[at[p.matrix] : at[p.matrix] + cut.rows * kernels.row_bytes(p.qtype, n_embd)],
                                   p.qtype, cut.rows, n_embd)[0] for p in (ref.part("gate"), ref.part("up")))
        return silu(gate) * up
