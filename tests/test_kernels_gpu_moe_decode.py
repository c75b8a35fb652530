"""Decode's small MoE kernels (kernels/gpu_moe_decode.py) and the two-matrix gemv, against numpy / moe.route.

Without CUDA they run under Triton's interpreter on CPU tensors (see tests/conftest.py); with CUDA, `-m gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from moe_tier.config import Gating  # noqa: E402
from moe_tier.kernels.gpu_gemv import SKIP, gemv, gemv_parts, gemv_split  # noqa: E402
from moe_tier.kernels.gpu_moe_decode import (HostRows, Publish, await_staged, combine, locate,  # noqa: E402
                                             route_topk, router_topk, silu_mul, stage)
from moe_tier.kernels.gpu_q8_1 import quantize_q8_1  # noqa: E402
from moe_tier.moe import route  # noqa: E402
from tests.test_kernels_gpu import DEVICE, TOL, gemv_reference, random_weight, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []


@pytest.mark.parametrize("gating,norm,scale,bias,E,k", [
    (Gating.SOFTMAX, True, 1.0, False, 8, 2),  # Mixtral
    (Gating.SOFTMAX, False, 1.0, False, 60, 4),  # qwen2moe: E not a power of two
    (Gating.SIGMOID, True, 2.5, True, 64, 6),  # DeepSeek-V3 style selection bias and scale
    (Gating.SOFTMAX_WEIGHT, False, 1.0, False, 32, 4),  # gpt-oss
])
def test_route_topk_matches_moe_route(gating, norm, scale, bias, E, k):
    rng = np.random.default_rng(E + k)
    logits = rng.standard_normal((5, E)).astype(np.float32) * 3
    logits[1, 3] = logits[1, 6] = logits[1].max() + 1  # a tie: the lower id comes first, as the stable argsort
    b = rng.standard_normal(E).astype(np.float32) * 0.5 if bias else None
    want = route(logits, k, gating, norm, scale, b)
    got = route_topk(torch.from_numpy(logits).to(DEVICE), None if b is None else torch.from_numpy(b).to(DEVICE),
                     k, gating, norm, scale)
    np.testing.assert_array_equal(got.ids.cpu().numpy(), want.ids)
    np.testing.assert_allclose(got.weights.cpu().numpy(), want.weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gating,norm,scale,bias,E,k,D", [
    (Gating.SOFTMAX, True, 1.0, False, 8, 2, 4096),  # Mixtral: the router over 8 programs
    (Gating.SOFTMAX, False, 1.0, False, 60, 4, 200),  # qwen2moe: E and D not powers of two
    (Gating.SIGMOID, True, 2.5, True, 64, 6, 96),
    (Gating.SOFTMAX_WEIGHT, False, 1.0, False, 32, 4, 288),  # gpt-oss: its router has a bias
])
def test_router_topk_computes_the_logits_and_routes_as_moe_route(gating, norm, scale, bias, E, k, D):
    """router_topk: the router's product in the same launch (parts of D summed by the last program of each
    token), then moe.route's selection; its counters are left 0 for the next launch (run twice)."""
    from moe_tier.kernels.gpu import _COUNTERS

    rng = np.random.default_rng(E + D)
    x = rng.standard_normal((3, D)).astype(np.float32)
    router = (rng.standard_normal((E, D)) / np.sqrt(D) * 3).astype(np.float32)
    router_bias = rng.standard_normal(E).astype(np.float32) if gating is Gating.SOFTMAX_WEIGHT else None
    b = rng.standard_normal(E).astype(np.float32) * 0.5 if bias else None
    logits = (x.astype(np.float64) @ router.T.astype(np.float64)).astype(np.float32)
    want = route(logits if router_bias is None else logits + router_bias, k, gating, norm, scale, b)
    dev = [None if a is None else torch.from_numpy(a).to(DEVICE) for a in (x, router, router_bias, b)]
    for _ in range(2):
        got = router_topk(*dev, k, gating, norm, scale)
        np.testing.assert_array_equal(got.ids.cpu().numpy(), want.ids)
        np.testing.assert_allclose(got.weights.cpu().numpy(), want.weights, rtol=1e-4, atol=1e-6)
    assert not any(c.any() for buffers in _COUNTERS.values() for c in buffers)


def test_gemv_parts_two_matrices_share_rows_of_x():
    """Gate and up of each row's expert in one launch; x row r // x_div; split parts sum to the product."""
    rng = np.random.default_rng(3)
    n_rows, n_cols = 40, 512
    mats = [random_weight(Q.Q4_K, n_rows, n_cols, rng) for _ in range(4)]  # expert a: (0, 1), expert b: (2, 3)
    blob = np.concatenate([m.ravel() for m in mats])
    size = mats[0].size
    base = torch.from_numpy(blob).to(DEVICE)
    offsets = torch.tensor([2 * size, 0, SKIP, 2 * size], dtype=torch.int64, device=DEVICE)  # 2 tokens x 2 rows
    x = rng.standard_normal((2, n_cols)).astype(np.float32)
    parts = gemv_parts(torch.from_numpy(x).to(DEVICE), base, offsets, Q.Q4_K, n_rows, n_cols, (0, size), x_div=2, split=2)
    assert parts.shape == (2, 2, 4, n_rows)
    got = parts.sum(dim=1).cpu().numpy()
    for r, first in enumerate([2, 0, None, 2]):
        for m in range(2):
            if first is None:
                assert not got[m, r].any()
            else:
                want = gemv_reference(x[r // 2 : r // 2 + 1], mats[first + m], Q.Q4_K, n_rows, n_cols)[0]
                assert rel_err(got[m, r], want) < TOL, (r, m)
    xt = torch.from_numpy(x).to(DEVICE)  # x quantized beforehand (xq): the same sums, no quantizing launch
    again = gemv_parts(xt, base, offsets, Q.Q4_K, n_rows, n_cols, (0, size), x_div=2, split=2, xq=quantize_q8_1(xt))
    assert torch.equal(again, parts)


def test_locate_reads_experts_staged_ahead_from_their_buffer():
    """A warm expert a lookahead staged (its id in the prefetched list with an offset) is read from there at once;
    a prefetched id whose copy was skipped (SKIP: it was hot) or a warm expert not prefetched is staged as usual;
    a hot expert keeps its slot even if predicted."""
    slot_bytes, n_expert, layer = 4096, 8, 1
    arena = torch.zeros(8 * slot_bytes, dtype=torch.uint8, device=DEVICE)
    far = -(1 << 40)  # pinned host memory lies outside the arena
    loc = torch.full((2 * n_expert,), SKIP, dtype=torch.int64)
    loc[layer * n_expert : (layer + 1) * n_expert] = torch.tensor([0, far, far + 1 * 4096, far + 2 * 4096, slot_bytes,
                                                                   far + 3 * 4096, far + 4 * 4096, far + 5 * 4096])
    loc = loc.to(DEVICE)
    ids = torch.tensor([2, 4, 1, 0], dtype=torch.int32, device=DEVICE)  # warm & prefetched, hot, warm, hot
    pf_ids = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    pf_at = torch.tensor([6 * slot_bytes, SKIP], dtype=torch.int64, device=DEVICE)  # 0 was hot: not copied
    stage_at = 2 * slot_bytes
    now, late, every = locate(ids, loc, layer * n_expert, arena, stage_at, 4, slot_bytes, (pf_ids, pf_at)).tolist()
    assert now == [6 * slot_bytes, slot_bytes, SKIP, 0]
    assert late == [SKIP, SKIP, stage_at + 2 * slot_bytes, SKIP]
    assert every == [6 * slot_bytes, slot_bytes, stage_at + 2 * slot_bytes, 0]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_two_launches_fill_one_buffer(qtype):
    """As decode runs hot rows and then staged rows: each launch skips the other's rows and writes its own S parts
    of one buffer; the sum over all parts is the one-launch product."""
    rng = np.random.default_rng(5)
    n_rows, n_cols = 40, 512
    mats = [random_weight(qtype, n_rows, n_cols, rng) for _ in range(4)]
    size = mats[0].size
    base = torch.from_numpy(np.concatenate([m.ravel() for m in mats])).to(DEVICE)
    every = torch.tensor([2 * size, 0, 2 * size, 0], dtype=torch.int64, device=DEVICE)
    first = torch.tensor([True, False, False, True], device=DEVICE)
    x = torch.from_numpy(rng.standard_normal((2, n_cols)).astype(np.float32)).to(DEVICE)
    S = gemv_split(qtype, n_rows, n_cols, 4, 2)
    buf = torch.full((2, 2 * S, 4, n_rows), float("nan"), device=DEVICE)
    for half, rows in [(0, first), (1, ~first)]:
        gemv_parts(x, base, torch.where(rows, every, SKIP), qtype, n_rows, n_cols, (0, size), x_div=2,
                   out=buf[:, half * S : (half + 1) * S])
    want = gemv_parts(x, base, every, qtype, n_rows, n_cols, (0, size), x_div=2).sum(dim=1)
    torch.testing.assert_close(buf.sum(dim=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_ff", [1500, 1504])
def test_silu_mul_and_combine_sum_split_parts(n_ff):
    """silu_mul also writes its output as q8_1 (as quantize_q8_1 would) where F is whole blocks of 32, and puts
    given values (the host's share) before each row's; F is not a multiple of its tile either way."""
    rng = np.random.default_rng(4)
    gate_up = rng.standard_normal((2, 3, 4, n_ff)).astype(np.float32)  # (2, S, R, F)
    g, u = gate_up.sum(axis=1)
    h, hq = silu_mul(torch.from_numpy(gate_up).to(DEVICE))
    np.testing.assert_allclose(h.cpu().numpy(), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    assert (hq is None) == (n_ff % 32 != 0)
    if hq is not None:
        for got, want in zip(hq, quantize_q8_1(h)):
            assert torch.equal(got, want)
    head = rng.standard_normal((4, 64)).astype(np.float32)  # the host's first values of each row
    h2, hq2 = silu_mul(torch.from_numpy(gate_up).to(DEVICE), head=torch.from_numpy(head).to(DEVICE))
    np.testing.assert_array_equal(h2.cpu().numpy(), np.concatenate([head, h.cpu().numpy()], axis=1))
    if hq is not None:
        for got, want in zip(hq2, quantize_q8_1(h2)):
            assert torch.equal(got, want)
    down = rng.standard_normal((3, 4, 1100)).astype(np.float32)  # (S, R=T*k, D)
    w = rng.random((2, 2)).astype(np.float32)
    got = combine(torch.from_numpy(down).to(DEVICE), torch.from_numpy(w).to(DEVICE)).cpu().numpy()
    y = down.sum(axis=0).reshape(2, 2, -1)
    np.testing.assert_allclose(got, (y * w[..., None]).sum(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("programs", [1, 3, 512])
def test_stage_copies_warm_blobs_and_keeps_hot_and_skipped_rows(programs):
    """Warm rows (offsets outside the arena: pinned host memory) get a staging copy (late); hot rows keep their
    slot (now), SKIP stays SKIP, rows past n_stage are read in place (now)."""
    slot_bytes, blob_bytes, n_slots = 4096, 3000, 4
    arena = torch.zeros(n_slots * slot_bytes, dtype=torch.uint8, device=DEVICE)
    arena[: slot_bytes] = torch.arange(slot_bytes, dtype=torch.int64).remainder(251).to(torch.uint8)
    warm = torch.randint(0, 256, (3 * slot_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    warm = warm.pin_memory() if DEVICE == "cuda" else warm
    far = warm.data_ptr() - arena.data_ptr()
    n_expert, layer = 4, 1
    loc = torch.full((2 * n_expert,), SKIP, dtype=torch.int64)
    loc[layer * n_expert + 0] = 0  # hot, slot 0
    loc[layer * n_expert + 1] = far + slot_bytes  # warm
    loc[layer * n_expert + 3] = far + 2 * slot_bytes  # warm
    loc = loc.to(DEVICE)
    ids = torch.tensor([1, 0, 2, 3], dtype=torch.int32, device=DEVICE)
    stage_at = 2 * slot_bytes  # the last two slots stage
    now, late, every = locate(ids, loc, layer * n_expert, arena, stage_at, 2, slot_bytes)
    assert now.tolist() == [SKIP, 0, SKIP, far + 2 * slot_bytes]  # row 3 is past n_stage: in place
    assert late.tolist() == [stage_at, SKIP, SKIP, SKIP]
    assert every.tolist() == [stage_at, 0, SKIP, far + 2 * slot_bytes]
    stage(ids, loc, layer * n_expert, arena, late, blob_bytes, programs)
    staged = arena[stage_at : stage_at + blob_bytes].cpu()
    assert torch.equal(staged, warm[slot_bytes : slot_bytes + blob_bytes])
    assert not arena[stage_at + slot_bytes :].any()  # row 1 (hot) staged nothing
    x = torch.ones(1, 256, device=DEVICE)
    assert gemv(x, arena, torch.tensor([stage_at], device=DEVICE), Q.Q4_K, 2, 256).shape == (1, 2)


def test_await_staged_waits_for_the_flag_copied_after_the_staged_rows():
    """The stream waits until the flag in VRAM holds the step's number (the host copies it after its copies of
    the staged rows), and only where a row is staged."""
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    seq = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    source = torch.tensor([3], dtype=torch.int32)
    stream = torch.cuda.Stream() if DEVICE == "cuda" else None
    if stream is not None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(10_000_000)  # the flag lands well after the wait began
            flag.copy_(source.pin_memory(), non_blocking=True)
    else:
        flag.copy_(source)
    await_staged(torch.tensor([SKIP, 0], device=DEVICE), flag, seq)
    after = flag.clone()  # queued after the wait on the compute stream: the flag as the wait left it
    assert after.item() == 3
    seq.fill_(4)  # no row staged: no wait for a flag that never comes
    await_staged(torch.tensor([SKIP, SKIP], device=DEVICE), flag, seq)
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def test_locate_publishes_and_silu_mul_waits_for_the_hosts_rows():
    """locate with a Publish also writes the staged rows' experts (-1 elsewhere), their staging offsets, the input
    and the step's number to host memory; silu_mul with HostRows puts what the host wrote in front of the staged
    rows' values once its flag holds that number, 0 in front of the others'."""
    R, D, H, F, slot_bytes = 4, 1500, 64, 96, 4096
    arena = torch.zeros(R * slot_bytes, dtype=torch.uint8, device=DEVICE)
    host = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in
            [("flag_in", 1, torch.int32), ("ids", R, torch.int32), ("late", R, torch.int64), ("x", (2, D), torch.float32),
             ("flag_out", 1, torch.int32), ("out", (R, H), torch.float32), ("warm", slot_bytes, torch.uint8)]}
    if DEVICE == "cuda":
        host = {name: t.pin_memory() for name, t in host.items()}
    at = {name: t.data_ptr() - arena.data_ptr() for name, t in host.items()}
    loc = torch.zeros(8, dtype=torch.int64)
    loc[[1, 2]] = at["warm"]  # experts 1 and 2 warm, the rest in slot 0
    ids = torch.tensor([5, 2, 7, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(2, D, device=DEVICE)
    seq = torch.tensor([7], dtype=torch.int32, device=DEVICE)
    hand = Publish(x, arena, at["flag_in"], at["ids"], at["late"], at["x"], seq)
    now, late, every = locate(ids, loc.to(DEVICE), 0, arena, 0, R, slot_bytes, publish=hand)
    assert late.tolist() == [SKIP, slot_bytes, SKIP, 3 * slot_bytes]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert host["flag_in"].tolist() == [7] and host["ids"].tolist() == [-1, 2, -1, 1]
    assert host["late"].tolist() == late.tolist()
    torch.testing.assert_close(host["x"], x.cpu())
    host["out"].copy_(torch.randn(R, H))
    host["flag_out"].fill_(7)
    gate_up = torch.randn(2, 1, R, F, device=DEVICE)
    h, _ = silu_mul(gate_up, head=HostRows(late, arena, at["flag_out"], at["out"], seq, H))
    want_head = host["out"].clone()
    want_head[[0, 2]] = 0
    torch.testing.assert_close(h[:, :H].cpu(), want_head)
    torch.testing.assert_close(h[:, H:], silu_mul(gate_up)[0])


