"""Where every expert's bytes are, as one table per GPU on that GPU: the decode step looks its experts up there
with the routing it computed, so choosing experts needs no host round trip.

Shape key: L layers, E experts per layer; loc[g] is (L * E,) int64 on GPU g, the byte offset of expert (l, e)'s
blob from the start of g's slot arena, or SKIP where g must skip it:
  hot on g                 -> its slot, inside g's arena
  not hot anywhere, pinned -> on the layer's home GPU only: its blob in the pinned warm arena, which the GPU reads
                              over PCIe (mapped host memory, the same address on both sides), with no copy
  hot on another GPU, cold -> SKIP (cold experts never reach the decode path: it runs only when all are pinned)
A step sums every GPU's rows, so each expert is computed exactly once. Entries change only by writes queued on
each GPU's compute stream, so a kernel sees the table as it was when the kernel was queued.
"""

from __future__ import annotations

import torch

from moe_tier.kernels.gpu_gemv import SKIP
from moe_tier.reader import ExpertId
from moe_tier.tiers.warm import PinnedArena


class ExpertLocations:
    def __init__(self, n_layer: int, n_expert: int, arenas: dict[int, torch.Tensor], warm: PinnedArena,
                 layer_gpu: dict[int, int]):
        self.n_expert, self.arenas, self.warm, self.layer_gpu = n_expert, arenas, warm, layer_gpu
        self.loc = {g: torch.full((n_layer * n_expert,), SKIP, dtype=torch.int64, device=a.device)
                    for g, a in arenas.items()}
        self.ready: dict[ExpertId, int] = {}  # hot experts the kernels read from a slot: expert -> GPU
        for eid in warm.offset:
            self._write(self.layer_gpu[eid.layer], eid, self._warm_offset(eid))

    def index(self, eid: ExpertId) -> int:
        return eid.layer * self.n_expert + eid.expert

    def _warm_offset(self, eid: ExpertId) -> int:
        """The pinned blob's address as an offset from the home GPU's arena (a flat, unified address space)."""
        home = self.arenas[self.layer_gpu[eid.layer]]
        return self.warm.arena.data_ptr() + self.warm.offset[eid] - home.data_ptr()

    def _write(self, gpu: int, eid: ExpertId, value: int) -> None:
        i = self.index(eid)
        with torch.cuda.device(self.loc[gpu].device):
            # fill_ passes the value as a kernel argument. `loc[i] = value` would copy it from pageable memory and
            # synchronise the stream: at decode that waits for a replay which itself waits on the host's CPU share.
            self.loc[gpu][i : i + 1].fill_(value)

    def hot(self, eid: ExpertId, gpu: int, offset: int) -> None:
        """eid's bytes are in its slot on gpu (queued after the copy that put them there)."""
        self._write(gpu, eid, offset)
        home = self.layer_gpu[eid.layer]
        if home != gpu:
            self._write(home, eid, SKIP)
        self.ready[eid] = gpu

    def left(self, eid: ExpertId, gpu: int) -> None:
        """eid no longer has its slot on gpu: read from its pinned copy (queued before the slot is reused)."""
        self.ready.pop(eid, None)
        home = self.layer_gpu[eid.layer]
        if home != gpu:
            self._write(gpu, eid, SKIP)
        self._write(home, eid, self._warm_offset(eid) if eid in self.warm else SKIP)

    def check(self, slot_of: dict, slot_bytes: int) -> None:
        """Every table entry is what the slot table and the finished copies say (reads the tables back)."""
        got = {g: loc.cpu().numpy() for g, loc in self.loc.items()}
        for eid, gpu in self.ready.items():
            assert slot_of.get(eid) is not None and slot_of[eid].gpu == gpu, f"{eid} ready on GPU {gpu} without its slot"
        for eid in (ExpertId(layer, e) for layer in self.layer_gpu for e in range(self.n_expert)):
            home, i = self.layer_gpu[eid.layer], self.index(eid)
            for g in got:
                if self.ready.get(eid) == g:
                    want = slot_of[eid].index * slot_bytes
                elif eid not in self.ready and g == home and eid in self.warm:
                    want = self._warm_offset(eid)
                else:
                    want = SKIP
                assert got[g][i] == want, f"GPU {g}: location of {eid} is {got[g][i]}, not {want}"
