"""Shared fixtures: tiny synthetic GGUF MoE models, each built once per test session and cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_tier.synth import SynthSpec, tiny, write_model


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
