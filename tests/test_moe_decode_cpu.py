"""DeviceMoE's bookkeeping on CPU tensors: the decode MoE's lookup, staging, lookahead buffers and accounting.

The kernels run under Triton's interpreter; CUDA's streams, events and device contexts become no-ops (the
interpreter runs every launch at once, in order), and a small slot pool stands in for GpuTiers (which needs
CUDA for pinned memory and copy streams). So this checks which bytes each row reads and what gets counted,
against the exact math; stream ordering is left to the GPU tests (tests/test_gpu_tiers.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from moe_tier.config import Gating  # noqa: E402
from moe_tier.moe import Routing, moe_ffn, route  # noqa: E402
from moe_tier.reader import ExpertId, open_model  # noqa: E402
from moe_tier.stats import EngineStats  # noqa: E402
from moe_tier.synth import tiny, write_fast  # noqa: E402
from moe_tier.tensors import Weights  # noqa: E402
from moe_tier.tiers.gpu_pool import Acquired  # noqa: E402
from moe_tier.tiers.locations import ExpertLocations  # noqa: E402
from moe_tier.tiers.warm import align_up  # noqa: E402
from tests.test_gpu_tiers import DequantizedExperts, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the real thing there")


class NoStream:
    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass


class NoEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def no_cuda_streams(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: NoStream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: NoStream())
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: NoEvent())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))


class HostPool:
    """GpuTiers' surface that DeviceMoE uses, on CPU tensors: the first n_hot experts in slots, every expert in
    a "pinned" arena, `stage` staging slots after the hot ones, no promotions."""

    def __init__(self, desc, n_hot: int, stage: int):
        self.desc, self.stats = desc, EngineStats()
        self.policy = type("Policy", (), {"touch": lambda self, eid: None})()
        self.planner = None  # the LRU path of account(): touch, then promote (never, here)
        self.slot_bytes = align_up(max(r.n_bytes for r in desc.experts.values()))
        self.arena = {0: torch.zeros((n_hot + stage) * self.slot_bytes, dtype=torch.uint8)}
        self.layer_gpu = dict.fromkeys(range(desc.config.n_layer), 0)
        self.stage_slots, self.stage_at = {0: stage}, {0: n_hot * self.slot_bytes}
        self.warm = type("Warm", (), {})()
        self.warm.offset = {}
        blobs, at = {}, 0
        for eid, ref in desc.experts.items():
            self.warm.offset[eid] = at
            blobs[eid] = np.concatenate([desc.data(p.offset, p.n_bytes) for p in ref.parts])
            at += align_up(ref.n_bytes)
        self.warm.arena = torch.zeros(at, dtype=torch.uint8)
        for eid, blob in blobs.items():
            self.warm.arena[self.warm.offset[eid] : self.warm.offset[eid] + blob.size] = torch.from_numpy(blob)
        self.locations = ExpertLocations(desc.config.n_layer, desc.config.n_expert, self.arena, self.warm,
                                         self.layer_gpu)
        self.table = type("Table", (), {})()
        self.table.slot_of = {}
        for i, eid in enumerate(list(desc.experts)[:n_hot]):
            self.arena[0][i * self.slot_bytes : i * self.slot_bytes + blobs[eid].size] = torch.from_numpy(blobs[eid])
            self.locations.hot(eid, 0, i * self.slot_bytes)
            self.table.slot_of[eid] = i

    def acquire(self, layer: int, counts: dict[int, int]) -> Acquired:
        """Every expert where it is: its slot, or its warm blob (read in place, by an offset from the arena)."""
        out = Acquired()
        far = self.warm.arena.data_ptr() - self.arena[0].data_ptr()
        for e in counts:
            eid = ExpertId(layer, e)
            at = self.table.slot_of[eid] * self.slot_bytes if eid in self.table.slot_of else far + self.warm.offset[eid]
            out.gpu.setdefault(0, []).append((eid, at))
        return out

    def settle(self) -> None:
        pass

    def promote(self, eid, gpu, protected) -> bool:
        return False


@pytest.mark.parametrize("distance,stage", [(0, 0), (0, 2), (1, 6), (2, 8)],
                         ids=["in-place", "staged", "lookahead-1", "lookahead-2"])
def test_each_row_reads_its_experts_bytes_and_every_use_is_counted(no_cuda_streams, tmp_path, distance, stage):
    """Four MoE layers, three experts hot, the rest warm: read in place, staged, or staged ahead by the gate
    lookahead (the model's own routers on random inputs, so some guesses are used and some are not). Every
    output is the exact math's, every use is counted once, and a copy made ahead counts as moved."""
    from moe_tier.moe_decode import DeviceMoE, lookaheads

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype="Q8_0", n_layer=4, n_embd=128, n_ff_exp=128)))
    pool = HostPool(desc, n_hot=3, stage=stage)
    moe = DeviceMoE(pool, lookaheads(Weights(desc), pool, distance) if distance else None)
    assert sorted((layer, la.target) for layer, la in moe.lookahead.items()) == \
        [(layer, layer + distance) for layer in range(4 - distance)] * bool(distance)
    exact, cfg = DequantizedExperts(desc), desc.config
    rng = np.random.default_rng(0)
    n_used = 0
    for _ in range(2):
        for layer in desc.moe_layers:
            x = rng.standard_normal((1, cfg.n_embd)).astype(np.float32)
            r = route(rng.standard_normal((1, cfg.n_expert)).astype(np.float32), cfg.n_expert_used, Gating.SOFTMAX,
                      weights_norm=True)
            n_used += len(np.unique(r.ids))
            got = moe(torch.from_numpy(x), Routing(torch.from_numpy(r.ids), torch.from_numpy(r.weights)), layer)
            assert rel_err(got.numpy(), moe_ffn(x, r, layer, exact)) < 1e-5
        moe.account()
    served, moved = pool.stats.tiers, pool.stats.links
    assert sum(c.hits for c in served.values()) == n_used
    assert served["warm"].hits == moved["warm->gpu read"].hits > 0
    if distance:
        assert 0 < served["ahead"].hits < moved["warm->gpu ahead"].hits
    else:
        assert "ahead" not in served and "warm->gpu ahead" not in moved


@pytest.mark.parametrize("n_tokens", [3, 12, 160], ids=["matrix-vector", "grouped kernel", "float16 cuBLAS"])
def test_routing_read_back_streams_whole_experts(no_cuda_streams, monkeypatch, tmp_path, n_tokens):
    """moe_ffn_gpu (prefill, or decode where routing is read back): up to DECODE_MAX_ROWS rows through the
    matrix-vector kernels (q8_1 activations), a few tokens an expert through the grouped kernel, from
    DEQUANT_MIN_ROWS an expert's matrices decoded to float16 for cuBLAS; hot and warm experts alike."""
    from moe_tier import moe_gpu
    from moe_tier.kernels.gpu import DEQUANT_MIN_ROWS
    from moe_tier.moe_gpu import DECODE_MAX_ROWS, moe_ffn_gpu

    kernels = []  # which kernel family each matmul took
    for name in ("gemv_parts", "moe_matmul", "matmul_dequantized"):
        real = getattr(moe_gpu, name)
        monkeypatch.setattr(moe_gpu, name, lambda *a, real=real, name=name, **k: kernels.append(name) or real(*a, **k))

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype="Q4_K", n_layer=2, n_embd=256, n_ff_exp=256)))
    pool, exact, cfg = HostPool(desc, n_hot=3, stage=0), DequantizedExperts(desc), desc.config
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n_tokens, cfg.n_embd)).astype(np.float32)
    r = route(rng.standard_normal((n_tokens, cfg.n_expert)).astype(np.float32), cfg.n_expert_used, Gating.SOFTMAX,
              weights_norm=True)
    assert (np.bincount(r.ids.ravel()).max() >= DEQUANT_MIN_ROWS) == (n_tokens > 100)
    assert (r.ids.size <= DECODE_MAX_ROWS) == (n_tokens < 10)
    got = moe_ffn_gpu(torch.from_numpy(x), r, desc.moe_layers[0], pool)
    tol, kernel = {3: (3e-2, "gemv_parts"), 12: (1e-5, "moe_matmul"), 160: (5e-3, "matmul_dequantized")}[n_tokens]
    assert set(kernels) == {kernel}  # q8_1 activations; the exact math; float16
    assert rel_err(got.numpy(), moe_ffn(x, r, desc.moe_layers[0], exact)) < tol


def test_the_device_path_stages_misses_unless_the_cpu_is_much_faster_than_the_link(no_cuda_streams, tmp_path):
    """With warm experts, decode keeps routing on the device (and stages every miss) unless the measured CPU
    computes an expert well sooner (CPU_PATH_MARGIN) than the link copies it: a CPU about as fast as the link (as
    on an H200 host: 50 against 54 GB/s) keeps the device path; with every expert in a slot the CPU's speed does
    not matter."""
    from moe_tier.moe_decode import device_path_possible
    from moe_tier.tiers.links import LinkSpeeds

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype="Q8_0", n_layer=2)))
    fast_link = LinkSpeeds(h2d_bytes_per_s=50e9, disk_bytes_per_s=1e9, cpu_bytes_per_s=20e9)
    as_fast = LinkSpeeds(h2d_bytes_per_s=50e9, disk_bytes_per_s=1e9, cpu_bytes_per_s=55e9)
    fast_cpu = LinkSpeeds(h2d_bytes_per_s=25e9, disk_bytes_per_s=1e9, cpu_bytes_per_s=60e9)
    some_warm, all_hot = HostPool(desc, n_hot=3, stage=2), HostPool(desc, n_hot=len(desc.experts), stage=0)
    for pool, speeds, why in [(some_warm, fast_link, None), (some_warm, as_fast, None), (some_warm, fast_cpu, "CPU"),
                              (all_hot, fast_cpu, None)]:
        pool.speeds = speeds
        reason = device_path_possible(pool)
        assert reason is None if why is None else why in reason


def test_no_device_path_where_an_experts_matrices_are_not_aligned(no_cuda_streams, monkeypatch, tmp_path):
    """The decode kernels load 16-byte words: a blob whose matrices would start unaligned (parts of odd sizes)
    keeps routing on the host, where such rows take the byte-wise grouped kernel."""
    from moe_tier import moe_decode
    from moe_tier.tiers.links import LinkSpeeds

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype="Q8_0", n_layer=2)))
    pool = HostPool(desc, n_hot=3, stage=2)
    pool.speeds = LinkSpeeds(h2d_bytes_per_s=50e9, disk_bytes_per_s=1e9, cpu_bytes_per_s=20e9)
    assert moe_decode.device_path_possible(pool) is None
    monkeypatch.setattr(moe_decode, "blob_layout", lambda ref: {"gate": 0, "up": 1000, "down": 2002})
    assert "aligned" in moe_decode.device_path_possible(pool)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_the_cpu_computes_its_share_of_each_staged_expert(no_cuda_streams, tmp_path, qtype):
    """With a CPU share, a staged expert's first columns run on the CPU (numba, from its pinned blob) and the
    rest on the GPU: outputs are the exact math's up to the two sides' activation rounding, and each warm use
    counts the bytes each side read."""
    from moe_tier.cpu_share import CUT_VALUES
    from moe_tier.moe_decode import DeviceMoE

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype=qtype, n_layer=3, n_embd=256,
                                                              n_ff_exp=2 * CUT_VALUES)))
    pool = HostPool(desc, n_hot=3, stage=2)
    moe = DeviceMoE(pool, cpu_share=0.6)
    assert moe.cpu is not None and {c.rows for c in moe.cpu.cuts.values()} == {CUT_VALUES}
    exact, cfg = DequantizedExperts(desc), desc.config
    rng = np.random.default_rng(1)
    n_warm = 0
    for layer in desc.moe_layers:
        x = rng.standard_normal((1, cfg.n_embd)).astype(np.float32)
        r = route(rng.standard_normal((1, cfg.n_expert)).astype(np.float32), cfg.n_expert_used, Gating.SOFTMAX,
                  weights_norm=True)
        n_warm += sum(ExpertId(layer, int(e)) not in pool.table.slot_of for e in r.ids[0])
        got = moe(torch.from_numpy(x), Routing(torch.from_numpy(r.ids), torch.from_numpy(r.weights)), layer)
        assert rel_err(got.numpy(), moe_ffn(x, r, layer, exact)) < 3e-2
    moe.account()
    moved, cut = pool.stats.links, next(iter(moe.cpu.cuts.values()))
    assert n_warm > 0 and moved["warm->cpu share"].hits == n_warm
    assert moved["warm->cpu share"].bytes == n_warm * cut.cpu_bytes
    blob = next(iter(desc.experts.values())).n_bytes
    assert moved["warm->gpu read"].bytes == n_warm * (blob - cut.cpu_bytes)


def test_the_cut_covers_each_expert_once_between_cpu_and_gpu(tmp_path):
    """plan_cut: the CPU's bytes (gate and up rows [0, f)) and the GPU's contiguous ranges (the rest, all of down)
    partition the expert's blob; the share is of the whole blob's bytes, at most gate's and up's less one
    CUT_VALUES of rows; types without a GPU kernel and tiny shares get none."""
    from moe_tier import kernels
    from moe_tier.cpu_share import CUT_VALUES, plan_cut
    from moe_tier.host_tiers import blob_layout

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("llama", qtype="Q4_K", n_layer=1, n_ff_exp=4 * CUT_VALUES)))
    ref = next(iter(desc.experts.values()))
    gate = ref.part("gate")
    row = kernels.row_bytes(gate.qtype, gate.shape[0])
    cut = plan_cut(ref, 0.5)
    assert cut.n_ff == 4 * CUT_VALUES and cut.rows == 3 * CUT_VALUES  # half of 3 matrices: 3/4 of gate and up
    covered = np.zeros(ref.n_bytes, dtype=np.int64)
    for at, n in cut.spans:
        covered[at : at + n] += 1
    assert covered.max() == 1 and ref.n_bytes - covered.sum() == cut.cpu_bytes == 2 * cut.rows * row
    assert covered[blob_layout(ref)["gate"] : cut.gate_up_at["gate"]].sum() == 0
    assert plan_cut(ref, 0.9).rows == 3 * CUT_VALUES  # the GPU keeps at least one CUT_VALUES of rows
    assert plan_cut(ref, 0.1) is None  # under one CUT_VALUES of rows
    odd = open_model(write_fast(tmp_path / "q4_0.gguf", tiny("llama", qtype="Q4_0", n_layer=1, n_ff_exp=1024)))
    assert plan_cut(next(iter(odd.experts.values())), 0.5) is None  # no GPU matrix-vector kernel for Q4_0


@pytest.mark.parametrize("part", ["compute", "_stage"])
def test_a_failing_cpu_share_raises_every_flag_so_no_kernel_spins(no_cuda_streams, tmp_path, part):
    """Should the host's part fail (its rows, or queuing the GPU's copies), its flags are raised anyway (the GPU's
    wait kernels would otherwise spin) and the error reaches the caller."""
    from moe_tier.cpu_share import CUT_VALUES
    from moe_tier.moe_decode import DeviceMoE

    desc = open_model(write_fast(tmp_path / "m.gguf", tiny("qwen3moe", qtype="Q4_K", n_layer=2, n_embd=256,
                                                              n_ff_exp=2 * CUT_VALUES)))
    pool = HostPool(desc, n_hot=0, stage=2)
    moe = DeviceMoE(pool, cpu_share=0.5)

    def broken(*args):
        raise MemoryError("no room")

    setattr(moe.cpu, part, broken)
    cfg = desc.config
    ids = np.arange(cfg.n_expert_used, dtype=np.int32)[None]
    weights = np.full((1, cfg.n_expert_used), 1 / cfg.n_expert_used, dtype=np.float32)
    with pytest.raises(MemoryError):
        moe(torch.ones(1, cfg.n_embd), Routing(torch.from_numpy(ids), torch.from_numpy(weights)), desc.moe_layers[0])
    assert [p.flag_out.item() for p in moe.cpu.step] == [moe.cpu.seq]
    assert [p.staged.item() for p in moe.cpu.step] == [moe.cpu.seq]  # the copy engine's flag too
