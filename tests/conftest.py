"""Shared fixtures: tiny synthetic GGUF MoE models, each built once per test session and cached."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from moe_tier.synth import SynthSpec, tiny, write_model


def _triton_interpreter_without_cuda() -> None:
    """Triton kernels are compiled or interpreted as they are defined, at import: without CUDA the interpreter
    must be chosen before any test module imports them, whatever order the modules are collected in."""
    if importlib.util.find_spec("torch") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_cuda()


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory):
    """`synth_model(arch, qtype="F32", layout="merged", **sizes) -> Path`: a tiny model (spec.tiny), built on
    first request and reused for the rest of the session. Extra keyword arguments override SynthSpec fields."""
    root = tmp_path_factory.mktemp("synth")
    built: dict[SynthSpec, Path] = {}

    def build(arch: str, qtype: str = "F32", layout: str = "merged", **sizes) -> Path:
        spec = tiny(arch, qtype=qtype, layout=layout, **sizes)
        if spec not in built:
            built[spec] = write_model(root / f"{arch}-{layout}-{spec.qtype.name}-{len(built)}.gguf", spec)
        return built[spec]

    return build
