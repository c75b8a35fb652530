"""The fused decode-step kernels against the torch expressions they replace (GpuOps.rms_norm, layers.rope and
GpuOps._causal over the updated f16 cache).

Without CUDA they run under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET before the
kernels are defined); with CUDA they run on the GPU and carry the `gpu` mark.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from moe_tier.config import RopeStyle
from moe_tier.gpu_ops import GpuOps
from moe_tier.kernels.gpu_decode_ops import add_rms_norm, decode_attention, rms_norm
from moe_tier.kernels.gpu_q8_1 import carried_q8_1, quantize_q8_1
from moe_tier.layers import rope, rope_angles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # `pytest -m gpu` on the GPU machine runs them too
GARBAGE_K, GARBAGE_V = 40.0, 1000.0  # cache rows past pos: they would dominate any softmax that saw them


def randn(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE)


@pytest.mark.parametrize("shape", [(3, 48), (2, 3, 16), (1, 130)], ids=str)
def test_rms_norm_matches_the_torch_expression(shape):
    rng = np.random.default_rng(sum(shape))
    x, w = randn(rng, *shape), randn(rng, shape[-1])
    got = rms_norm(x, w, 1e-6)
    assert got.shape == x.shape
    torch.testing.assert_close(got, GpuOps.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_returns_the_residual_sum_and_its_norm():
    rng = np.random.default_rng(2)
    x, r, w = randn(rng, 2, 40), randn(rng, 2, 40), randn(rng, 40)
    x_before = x.clone()
    s, h = add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(x, x_before)  # a new tensor, the input left alone
    torch.testing.assert_close(h, GpuOps.rms_norm(x + r, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [96, 160], ids=str)  # 160: a row narrower than its power-of-2 block
def test_add_rms_norm_writes_the_q8_1_form_the_gemv_would_quantize(width):
    """With quant, the norm carries its q8_1 form, bit for bit what quantize_q8_1 makes of it, for the matrix-vector
    kernels after it; without, or for rows not a multiple of 32 wide, nothing is carried."""
    rng = np.random.default_rng(width)
    x, r, w = randn(rng, 3, width), randn(rng, 3, width), randn(rng, width)
    _, h = add_rms_norm(x, r, w, 1e-5, quant=True)
    for got, want in zip(carried_q8_1(h), quantize_q8_1(h)):
        assert torch.equal(got, want)
    assert carried_q8_1(add_rms_norm(x, r, w, 1e-5)[1]) is None
    assert carried_q8_1(add_rms_norm(x[:, :40], r[:, :40], w[:40], 1e-5, quant=True)[1]) is None


def reference_attention(q, k, v, cos, sin, style, k_cache, v_cache, pos, n_keys):
    """The captured branch of GpuOps.attend: rope, f16 cache rows at pos, then _causal over n_keys rows."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[pos] = rope(k, cos, sin, style)[0].half()
    v_cache[pos] = v[0].half()
    ops = SimpleNamespace(cfg=SimpleNamespace(head_dim_k=q.shape[-1]), device=DEVICE)
    qpos = torch.tensor([pos], device=DEVICE)
    out = GpuOps._causal(ops, rope(q, cos, sin, style), k_cache[:n_keys], v_cache[:n_keys], qpos)
    return out, k_cache, v_cache


CASES = {  # H, Hkv, d, n_rot, dv, ctx, n_keys, pos, block_l, split
    "norm-gqa2-middle": (4, 2, 12, 8, 8, 48, 37, 20, 16, 1),
    "norm-gqa2-split3": (4, 2, 12, 8, 8, 48, 37, 20, 16, 3),
    "neox-gqa1-split2": (2, 2, 16, 12, 12, 40, 37, 30, 16, 2),
    "neox-pos0": (4, 1, 8, 8, 16, 24, 21, 0, 16, 2),
    "norm-last-row": (2, 1, 16, 16, 8, 33, 33, 32, 16, 3),
    "norm-default-split": (2, 1, 16, 8, 8, 700, 650, 520, 64, None),
    "head-dim-128": (4, 2, 128, 128, 128, 80, 70, 40, 64, None),
    "head-dim-64-gqa4": (8, 2, 64, 64, 64, 80, 70, 69, 32, 2),
}


@pytest.mark.parametrize("style", [RopeStyle.NORM, RopeStyle.NEOX], ids=lambda s: s.name)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decode_attention_matches_causal_over_the_updated_cache(case, style):
    H, Hkv, d, n_rot, dv, ctx, n_keys, pos, block_l, split = case
    rng = np.random.default_rng([H, d, ctx, pos])
    q, k, v = randn(rng, 1, H, d), randn(rng, 1, Hkv, d), randn(rng, 1, Hkv, dv)
    cos, sin = (torch.from_numpy(a).to(DEVICE) for a in rope_angles(pos, 1, n_rot, 10000.0, 1.0))
    k_cache, v_cache = randn(rng, ctx, Hkv, d).half(), randn(rng, ctx, Hkv, dv).half()
    k_cache[pos:], v_cache[pos:] = GARBAGE_K, GARBAGE_V  # the row at pos too: it must be overwritten
    want, k_want, v_want = reference_attention(q, k, v, cos, sin, style, k_cache, v_cache, pos, n_keys)

    got = decode_attention(q, k, v, cos, sin, style is RopeStyle.NEOX, k_cache, v_cache,
                           torch.tensor([pos], device=DEVICE), n_keys, d**-0.5, split=split, block_l=block_l)
    assert got.shape == (1, H * dv)
    # f16 rounding of probabilities may flip last bits: the tolerance is a small part of the values' scale
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    if dv % 32 == 0:  # the output carries its q8_1 form for the output projection, as quantize_q8_1 makes it
        for carried, made in zip(carried_q8_1(got), quantize_q8_1(got)):
            assert torch.equal(carried, made)
    else:
        assert carried_q8_1(got) is None
    others = torch.arange(ctx, device=DEVICE) != pos
    assert torch.equal(k_cache[others], k_want[others]) and torch.equal(v_cache[others], v_want[others])
    torch.testing.assert_close(k_cache[pos], k_want[pos], rtol=1e-3, atol=1e-3)  # FMA on the GPU: an f16 ulp
    assert torch.equal(v_cache[pos], v_want[pos])


def test_decode_attention_writes_into_one_layer_of_a_larger_cache():
    """The cache is a view cache.k[layer] of (n_layer, ctx, Hkv, d): other layers stay untouched."""
    rng = np.random.default_rng(9)
    H, Hkv, d, dv, ctx, pos = 2, 2, 8, 8, 20, 5
    q, k, v = randn(rng, 1, H, d), randn(rng, 1, Hkv, d), randn(rng, 1, Hkv, dv)
    cos, sin = (torch.from_numpy(a).to(DEVICE) for a in rope_angles(pos, 1, d, 10000.0, 1.0))
    kc, vc = randn(rng, 3, ctx, Hkv, d).half(), randn(rng, 3, ctx, Hkv, dv).half()
    k_before, v_before = kc.clone(), vc.clone()
    want, k_want, v_want = reference_attention(q, k, v, cos, sin, RopeStyle.NORM, kc[1], vc[1], pos, ctx)
    got = decode_attention(q, k, v, cos, sin, False, kc[1], vc[1], torch.tensor([pos], device=DEVICE), ctx, d**-0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    for layer in (0, 2):
        assert torch.equal(kc[layer], k_before[layer]) and torch.equal(vc[layer], v_before[layer])
    torch.testing.assert_close(kc[1], k_want, rtol=1e-3, atol=1e-3)
    assert torch.equal(vc[1], v_want)
