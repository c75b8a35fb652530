"""GGUF MoE reader: one memory map, a tensor catalog by category, and every routed expert's byte ranges.

The file is never copied: tensors and experts are numpy views into the map, so a tier can
move an expert with one read of its byte range.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, Keys

from moe_tier.config import ARCH_TRAITS, ModelConfig, field_value, from_metadata
from moe_tier.errors import MoeTierError

GGUF_MAGIC = b"GGUF"


class Category(enum.Enum):
    DENSE = "dense"  # embeddings, output head, norms, attention, leading dense FFNs
    ROUTER = "router"  # ffn_gate_inp (+ bias), expert score bias
    SHARED = "shared"  # *_shexp, including ffn_gate_inp_shexp
    ROUTED = "routed"  # the experts a router chooses between


class ExpertId(NamedTuple):
    """One routed expert: the unit every tier moves."""

    layer: int
    expert: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: ne0 (row length) first
    offset: int  # absolute byte offset in the file
    n_bytes: int
    category: Category
    layer: int | None


@dataclass(frozen=True)
class ExpertPart:
    """One matrix (or bias) of one expert: a contiguous byte range of the file."""

    matrix: str  # gate, up, down, gate_up; with a "_bias" suffix for biases
    tensor: str  # the GGUF tensor it lives in
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # this expert's slice, GGUF order (row length first)
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class ExpertRef:
    id: ExpertId
    parts: tuple[ExpertPart, ...]

    @property
    def n_bytes(self) -> int:
        return sum(p.n_bytes for p in self.parts)

    def part(self, matrix: str) -> ExpertPart:
        for p in self.parts:
            if p.matrix == matrix:
                return p
        raise KeyError(matrix)


# blk.N.ffn_gate_exps.weight / blk.N.ffn_gate_up_exps.bias (merged) and blk.N.ffn_gate.E.weight (legacy Mixtral)
_MERGED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
_LEGACY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_ROUTER = re.compile(r"^blk\.(\d+)\.(ffn_gate_inp\.(weight|bias)|exp_probs_b(\.bias)?)$")
_SHARED = re.compile(r"^blk\.(\d+)\.\w+_shexp\.(weight|bias)$")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def classify(name: str) -> Category:
    if _MERGED.match(name) or _LEGACY.match(name):
        return Category.ROUTED
    if _ROUTER.match(name):
        return Category.ROUTER
    if _SHARED.match(name):
        return Category.SHARED
    return Category.DENSE


@dataclass(frozen=True)
class ModelDesc:
    """Everything moe-tier knows about a GGUF MoE file, plus the map that serves its bytes."""

    path: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]
    experts: dict[ExpertId, ExpertRef]
    metadata: dict
    file_bytes: int
    reader: GGUFReader

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({e.layer for e in self.experts}))

    def bytes_by_category(self) -> dict[str, int]:
        totals = {c.value: 0 for c in Category}
        for t in self.tensors.values():
            totals[t.category.value] += t.n_bytes
        return totals

    def data(self, offset: int, n_bytes: int) -> np.ndarray:
        """uint8 view of a byte range of the file (no copy)."""
        return self.reader.data[offset : offset + n_bytes]

    def expert_data(self, eid: ExpertId, matrix: str) -> np.ndarray:
        p = self.experts[eid].part(matrix)
        return self.data(p.offset, p.n_bytes)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the weights: metadata, tensor catalog and a sample of every tensor's bytes."""
        h = hashlib.sha256()
        h.update(repr(sorted((k, v) for k, v in self.metadata.items() if not k.startswith("tokenizer."))).encode())
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            h.update(f"{t.name}:{t.qtype.name}:{t.shape}:{t.n_bytes}".encode())
            h.update(self.data(t.offset, min(t.n_bytes, 256)).tobytes())
        return h.hexdigest()[:16]


def open_model(path: str | Path) -> ModelDesc:
    """Read a GGUF MoE file's description; MoeTierError names the file and the problem."""
    path = Path(path)
    reader = _open_gguf(path)
    metadata = {f.name: field_value(f) for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if arch not in ARCH_TRAITS:
        known = ", ".join(ARCH_TRAITS)
        raise MoeTierError(path, f"unsupported architecture {arch!r} (supported: {known})")
    tensors = _catalog(reader)
    _check_extent(path, tensors)
    experts = _experts(tensors)
    if not experts:
        raise MoeTierError(path, f"not a mixture-of-experts model: {arch} file has no routed expert tensors")
    n_vocab = _vocab_size(reader, tensors)
    shapes = {name: t.shape for name, t in tensors.items()}
    try:
        config = from_metadata(arch, metadata, n_vocab, shapes)
    except (TypeError, ValueError) as err:
        raise MoeTierError(path, f"bad or missing {arch} hyper-parameters: {err}") from None
    return ModelDesc(path, config, tensors, experts, metadata, path.stat().st_size, reader)


def _open_gguf(path: Path) -> GGUFReader:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise MoeTierError(path, "no such file") from None
    except IsADirectoryError:
        raise MoeTierError(path, "is a directory, not a GGUF file") from None
    except OSError as err:
        raise MoeTierError(path, f"cannot read: {err.strerror}") from None
    if magic != GGUF_MAGIC:
        raise MoeTierError(path, "not a GGUF file (bad magic)")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError):
        size = path.stat().st_size
        raise MoeTierError(path, f"truncated or corrupt GGUF file ({size:,} bytes): its header or tensor data "
                                 "runs past the end of the file") from None


def _catalog(reader: GGUFReader) -> dict[str, TensorInfo]:
    tensors = {}
    for t in reader.tensors:
        layer = _LAYER.match(t.name)
        tensors[t.name] = TensorInfo(
            name=t.name,
            qtype=t.tensor_type,
            shape=tuple(int(d) for d in t.shape),
            offset=int(t.data_offset),
            n_bytes=int(t.n_bytes),
            category=classify(t.name),
            layer=int(layer.group(1)) if layer else None,
        )
    return tensors


def _check_extent(path: Path, tensors: dict[str, TensorInfo]) -> None:
    end = max((t.offset + t.n_bytes for t in tensors.values()), default=0)
    size = path.stat().st_size
    if end > size:
        raise MoeTierError(path, f"truncated: tensor data ends at byte {end:,} but the file has {size:,} bytes")


def _experts(tensors: dict[str, TensorInfo]) -> dict[ExpertId, ExpertRef]:
    parts: dict[ExpertId, list[ExpertPart]] = {}
    for t in tensors.values():
        if m := _MERGED.match(t.name):
            layer, matrix, kind = int(m.group(1)), m.group(2), m.group(3)
            n_expert = t.shape[-1]
            per_expert = t.n_bytes // n_expert
            for e in range(n_expert):
                part = ExpertPart(
                    matrix=matrix if kind == "weight" else f"{matrix}_bias",
                    tensor=t.name,
                    qtype=t.qtype,
                    shape=t.shape[:-1],
                    offset=t.offset + e * per_expert,
                    n_bytes=per_expert,
                )
                parts.setdefault(ExpertId(layer, e), []).append(part)
        elif m := _LEGACY.match(t.name):
            eid = ExpertId(int(m.group(1)), int(m.group(3)))
            part = ExpertPart(m.group(2), t.name, t.qtype, t.shape, t.offset, t.n_bytes)
            parts.setdefault(eid, []).append(part)
    order = {"gate": 0, "up": 1, "gate_up": 2, "down": 3}
    return {
        eid: ExpertRef(eid, tuple(sorted(ps, key=lambda p: (p.matrix.endswith("_bias"), order.get(p.matrix.split("_bias")[0], 9)))))
        for eid, ps in sorted(parts.items())
    }


def _vocab_size(reader: GGUFReader, tensors: dict[str, TensorInfo]) -> int:
    embd = tensors.get("token_embd.weight")
    if embd is not None:
        return embd.shape[1]
    field = reader.fields.get(Keys.Tokenizer.LIST)
    return len(field.data) if field is not None else 0

