"""Full-size synthetic models in minutes: every quantized tensor is a rotation of a pool of random blocks.

Quantizing 46 G values with numpy would take hours. Instead a few MiB of well-formed blocks are built once
per (type, scale): for K-quants and IQ4 random bytes with the fp16 super-block scales (d, dmin) set so the
dequantized values have mean ~0 and std ~1/sqrt(fan_in); for 32-block types gguf's quantizer on random
normals. Each tensor then streams the pool from a block-aligned, name-dependent offset in large writes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from moe_tier.synth.spec import SynthSpec
from moe_tier.synth.tensors import TensorPlan
from moe_tier.synth.writer import tensor_nbytes, tensor_values, value_std, write_gguf

POOL_BYTES = 8 << 20
_SAMPLE_BLOCKS = 4096  # enough blocks to measure a pool's mean and spread

# Byte offsets of the fp16 (d, dmin) fields in each block, from ggml-common.h (block_q2_K ... block_iq4_xs).
_SCALE_FIELDS = {
    QT.Q2_K: (80, 82), QT.Q3_K: (108, None), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, None),
    QT.IQ4_XS: (0, None), QT.IQ4_NL: (0, None),
}


def write_fast(path: str | Path, spec: SynthSpec, pool_bytes: int = POOL_BYTES) -> Path:
    """Write `spec` with pooled random blocks instead of quantized random weights (deterministic too).
    Tensors larger than pool_bytes repeat it; tests pass a small pool to build quickly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pools: dict[tuple[QT, float], memoryview] = {}

    def tensor_bytes(plan: TensorPlan, qtype: QT) -> Iterable[bytes | memoryview]:
        if not plan.quantizable:  # norms, router, biases: small, exact values
            yield memoryview(tensor_values(plan, spec.seed)).cast("B")
            return
        scale = value_std(plan)
        if (qtype, scale) not in pools:
            pools[(qtype, scale)] = memoryview(block_pool(qtype, scale, spec.seed, pool_bytes))
        yield from _rotate(pools[(qtype, scale)], gguf.GGML_QUANT_SIZES[qtype][1], tensor_nbytes(plan, qtype),
                           zlib.crc32(plan.name.encode()))

    write_gguf(path, spec, tensor_bytes)
    return path


def _rotate(pool: memoryview, type_size: int, nbytes: int, salt: int) -> Iterable[memoryview]:
    """nbytes of the pool, starting at a block boundary chosen by salt and wrapping around."""
    start = salt % (len(pool) // type_size) * type_size
    while nbytes > 0:
        chunk = pool[start:start + nbytes]
        yield chunk
        nbytes -= len(chunk)
        start = 0


def block_pool(qtype: QT, std: float, seed: int, nbytes: int = POOL_BYTES) -> np.ndarray:
    """About nbytes of valid `qtype` blocks whose dequantized values have mean ~0 and standard deviation ~std."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = max(1, nbytes // type_size)
    rng = np.random.default_rng([seed, int(qtype), zlib.crc32(repr(std).encode())])
    if qtype not in _SCALE_FIELDS:
        values = rng.standard_normal((n_blocks, block_size), dtype=np.float32) * np.float32(std)
        data = values if qtype == QT.F32 else gguf.quants.quantize(values, qtype)
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    d_at, dmin_at = _SCALE_FIELDS[qtype]
    # Dequantization is linear in d and dmin: measure both parts on a sample, then solve for mean 0, std `std`.
    sample = blocks[:_SAMPLE_BLOCKS]
    d_part = _dequantize_with(sample, qtype, d_at, dmin_at, 1.0, 0.0)
    if dmin_at is None:
        d, dmin = std / float(d_part.std()), 0.0
    else:
        dmin_part = _dequantize_with(sample, qtype, d_at, dmin_at, 0.0, 1.0)
        ratio = -float(d_part.mean()) / float(dmin_part.mean())
        d = std / float((d_part + ratio * dmin_part).std())
        dmin = d * ratio
    jitter = rng.uniform(0.75, 1.25, n_blocks)  # per-block scales differ, as in real files
    _set_f16(blocks, d_at, d * jitter)
    if dmin_at is not None:
        _set_f16(blocks, dmin_at, dmin * jitter)
    # The quant fields are bounded integers, so finite fp16 scales make every value finite.
    scales = [blocks[:, at:at + 2].copy().view(np.float16) for at in (d_at, dmin_at) if at is not None]
    if not all(np.isfinite(s).all() for s in scales):
        raise AssertionError(f"{qtype.name} pool has non-finite scales")
    return blocks.reshape(-1)


def _set_f16(blocks: np.ndarray, at: int, values: np.ndarray | float) -> None:
    blocks[:, at:at + 2] = np.broadcast_to(np.asarray(values, np.float16), (len(blocks),))[:, None].view(np.uint8)


def _dequantize_with(blocks: np.ndarray, qtype: QT, d_at: int, dmin_at: int | None,
                     d: float, dmin: float) -> np.ndarray:
    probe = blocks.copy()
    _set_f16(probe, d_at, d)
    if dmin_at is not None:
        _set_f16(probe, dmin_at, dmin)
    return gguf.quants.dequantize(probe, qtype)
