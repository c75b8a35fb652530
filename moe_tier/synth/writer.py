"""write_model: a small deterministic random GGUF MoE model that llama.cpp loads.

gguf's numpy quantizers write F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/MXFP4 directly; K-quants and IQ4 are
made by writing F32 first and quantizing with llama.cpp (`llama_model_quantize`, pure=True), since gguf
has no K-quantizer.
"""

from __future__ import annotations

import ctypes
import logging
import math
import zlib
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from moe_tier.errors import MoeTierError
from moe_tier.synth.metadata import add_metadata, file_type
from moe_tier.synth.spec import LLAMA_QTYPES, SynthSpec
from moe_tier.synth.tensors import TensorPlan, plan_tensors, stored_qtype

TensorBytes = Callable[[TensorPlan, QT], Iterable[bytes | memoryview]]


def write_model(path: str | Path, spec: SynthSpec) -> Path:
    """Write `spec` to `path` (overwriting it); the same spec always gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.qtype not in LLAMA_QTYPES:
        write_gguf(path, spec, _random_tensor_bytes(spec))
        return path
    f32_path = path.with_name(path.name + ".f32.tmp")
    try:
        f32_spec = spec.replace(qtype=QT.F32)
        write_gguf(f32_path, f32_spec, _random_tensor_bytes(f32_spec))
        quantize_with_llama(f32_path, path, spec.qtype)
    finally:
        f32_path.unlink(missing_ok=True)
    return path


def tensor_nbytes(plan: TensorPlan, qtype: QT) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(plan.ne) // block_size * type_size


def write_gguf(path: Path, spec: SynthSpec, tensor_bytes: TensorBytes) -> None:
    """Header and tensor infos through gguf's writer, then each tensor streamed in file order."""
    plans = plan_tensors(spec)
    writer = gguf.GGUFWriter(path, arch=spec.arch)
    add_metadata(writer, spec)
    for plan in plans:
        qtype = stored_qtype(plan, spec.qtype)
        writer.add_tensor_info(plan.name, plan.ne[::-1], np.dtype(np.float32), tensor_nbytes(plan, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]  # one shard; gguf's writer only streams numpy arrays, so tensor data goes here directly
    writer.write_padding(fout, fout.tell())
    try:
        for plan in plans:
            qtype = stored_qtype(plan, spec.qtype)
            written = 0
            for chunk in tensor_bytes(plan, qtype):
                written += fout.write(chunk)
            if written != tensor_nbytes(plan, qtype):
                raise AssertionError(f"{plan.name}: wrote {written} bytes, expected {tensor_nbytes(plan, qtype)}")
            writer.write_padding(fout, written)
    finally:
        writer.close()


def value_std(plan: TensorPlan) -> float:
    """Spread of a tensor's random values, chosen so a forward pass stays finite and not flat: matmul
    weights ~ N(0, 1/fan_in) (fan-in = ne[0]), the router wider so top-k is decided clearly, biases small."""
    fan_in = plan.ne[0]
    stds = {"embd": 1.0, "weight": fan_in ** -0.5, "router": 2.0 * fan_in ** -0.5, "bias": 0.02, "sinks": 0.5}
    return stds[plan.role]


def tensor_values(plan: TensorPlan, seed: int) -> np.ndarray:
    """float32 values in numpy order (reversed ne): norms uniform near 1, everything else normal (value_std)."""
    shape = plan.ne[::-1]
    if plan.role == "norm":
        return _rng(seed, plan.name, 0).uniform(0.9, 1.1, shape).astype(np.float32)
    scale = value_std(plan)
    if plan.part is not None:  # one expert of the merged tensor `key`
        values = _normal(seed, plan.key, plan.part + 1, shape)
    elif plan.key and len(shape) == 3:  # merged experts: the same per-expert streams, stacked
        values = np.stack([_normal(seed, plan.key, x + 1, shape[1:]) for x in range(shape[0])])
    else:
        values = _normal(seed, plan.name, 0, shape)
    return values * np.float32(scale)


def _rng(seed: int, key: str, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode()), part])


def _normal(seed: int, key: str, part: int, shape: tuple[int, ...]) -> np.ndarray:
    return _rng(seed, key, part).standard_normal(shape, dtype=np.float32)


def _random_tensor_bytes(spec: SynthSpec) -> TensorBytes:
    def tensor_bytes(plan: TensorPlan, qtype: QT) -> Iterable[bytes | memoryview]:
        values = tensor_values(plan, spec.seed)
        data = values if qtype == QT.F32 else gguf.quants.quantize(values, qtype)
        yield memoryview(np.ascontiguousarray(data)).cast("B")
    return tensor_bytes


def quantize_with_llama(src: Path, dst: Path, qtype: QT) -> None:
    """llama.cpp's quantizer with pure=True: every quantizable tensor (token_embd and output included) gets
    qtype's type; norms, biases and ffn_gate_inp stay F32 (llama-quant.cpp tensor_allows_quantization).
    None of Q2_K (as file type MOSTLY_Q2_K, not Q2_K_S), Q3_K..Q6_K, IQ4_XS, IQ4_NL needs an imatrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(qtype))
    params.pure = True
    params.nthread = 2
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python's log callback prints at this level
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0:
        raise MoeTierError(dst, f"llama.cpp could not quantize the synthetic model to {qtype.name} (rc {rc})")
