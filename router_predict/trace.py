"""Routing traces: which experts every token chose at every MoE layer, in one versioned npz file.

Shape key: N tokens, L MoE layers (in model order), K experts used per token, E experts per layer.

Format `moe-tier-trace` version 1 (an uncompressed numpy npz):
  meta          0-d str   JSON: format, version, fingerprint, arch, engine, n_layer, n_expert, n_expert_used
  moe_layers    (L,)      int32    model layer index of each traced MoE layer
  expert_ids    (N, L, K) int16    chosen experts, in the engine's top-k order
  weights       (N, L, K) float32  the gate weights the layer actually applied (after any normalisation)
  is_prompt     (N,)      bool     token came from the prompt (True) or was generated (False)
  sequence      (N,)      int32    which prompt/generation stream the token belongs to
  position      (N,)      int32    position of the token in its sequence
  token         (N,)      int32    vocabulary id, -1 where unknown
Tokens are stored in execution order; within a sequence, positions increase.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from moe_tier.errors import MoeTierError

FORMAT = "moe-tier-trace"
VERSION = 1
ARRAYS = ("moe_layers", "expert_ids", "weights", "is_prompt", "sequence", "position", "token")


@dataclass(frozen=True, eq=False)
class Trace:
    """One or more sequences of routing decisions from one model."""

    fingerprint: str
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    moe_layers: np.ndarray  # (L,) int32
    expert_ids: np.ndarray  # (N, L, K) int16
    weights: np.ndarray  # (N, L, K) float32
    is_prompt: np.ndarray  # (N,) bool
    sequence: np.ndarray  # (N,) int32
    position: np.ndarray  # (N,) int32
    token: np.ndarray  # (N,) int32
    engine: str = "unknown"
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def n_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def n_moe_layers(self) -> int:
        return int(self.moe_layers.shape[0])

    def select(self, mask: np.ndarray) -> "Trace":
        """The tokens where `mask` (N,) is true, keeping their order."""
        return replace(self, **{k: getattr(self, k)[mask] for k in ARRAYS if k != "moe_layers"})

    def sequences(self) -> np.ndarray:
        """Sequence ids in order of first appearance."""
        _, first = np.unique(self.sequence, return_index=True)
        return self.sequence[np.sort(first)]

    def flat_ids(self) -> np.ndarray:
        """(N, L, K) global expert ids `layer_position * E + expert`, the key every cache uses."""
        offsets = (np.arange(self.n_moe_layers, dtype=np.int32) * self.n_expert)[None, :, None]
        return self.expert_ids.astype(np.int32) + offsets


def validate(trace: Trace) -> None:
    """Raise MoeTierError naming what is inconsistent; a trace that passes can be replayed."""
    path = trace.source
    n, L, K = trace.expert_ids.shape if trace.expert_ids.ndim == 3 else (None, None, None)
    if n is None:
        raise MoeTierError(path, f"expert_ids must be (tokens, layers, k), got shape {trace.expert_ids.shape}")
    if trace.weights.shape != trace.expert_ids.shape:
        raise MoeTierError(path, f"weights shape {trace.weights.shape} != expert_ids shape {trace.expert_ids.shape}")
    for name in ("is_prompt", "sequence", "position", "token"):
        if getattr(trace, name).shape != (n,):
            raise MoeTierError(path, f"{name} has shape {getattr(trace, name).shape}, expected ({n},)")
    if trace.moe_layers.shape != (L,):
        raise MoeTierError(path, f"moe_layers has {trace.moe_layers.shape[0]} entries for {L} traced layers")
    if K != trace.n_expert_used:
        raise MoeTierError(path, f"k={K} in expert_ids but n_expert_used={trace.n_expert_used}")
    if L and (trace.moe_layers.min() < 0 or trace.moe_layers.max() >= trace.n_layer):
        raise MoeTierError(path, f"moe_layers outside 0..{trace.n_layer - 1}")
    if n and (trace.expert_ids.min() < 0 or trace.expert_ids.max() >= trace.n_expert):
        raise MoeTierError(path, f"expert ids outside 0..{trace.n_expert - 1}")
    if n and not np.isfinite(trace.weights).all():
        raise MoeTierError(path, "gate weights contain NaN or inf")


def save(trace: Trace, path: str | Path) -> None:
    meta = {
        "format": FORMAT, "version": VERSION, "fingerprint": trace.fingerprint, "arch": trace.arch,
        "engine": trace.engine, "n_layer": trace.n_layer, "n_expert": trace.n_expert,
        "n_expert_used": trace.n_expert_used,
    }
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
        np.savez(f, meta=np.array(json.dumps(meta)), **{k: getattr(trace, k) for k in ARRAYS})


def load(path: str | Path) -> Trace:
    """Read and validate a trace; a truncated, foreign or newer-version file raises MoeTierError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ARRAYS}
    except FileNotFoundError:
        raise MoeTierError(path, "no such trace file") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise MoeTierError(path, f"not a readable moe-tier trace (truncated or damaged: {err})") from None
    if meta.get("format") != FORMAT:
        raise MoeTierError(path, f"not a moe-tier trace (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise MoeTierError(path, f"trace version {meta.get('version')} is not supported (this reads {VERSION})")
    return Trace(
        fingerprint=meta["fingerprint"], arch=meta["arch"], engine=meta.get("engine", "unknown"),
        n_layer=int(meta["n_layer"]), n_expert=int(meta["n_expert"]), n_expert_used=int(meta["n_expert_used"]),
        moe_layers=arrays["moe_layers"].astype(np.int32), expert_ids=arrays["expert_ids"].astype(np.int16),
        weights=arrays["weights"].astype(np.float32), is_prompt=arrays["is_prompt"].astype(bool),
        sequence=arrays["sequence"].astype(np.int32), position=arrays["position"].astype(np.int32),
        token=arrays["token"].astype(np.int32), source=str(path),
    )


def merge(traces: list[Trace]) -> Trace:
    """Concatenate traces of the same model; sequence ids are renumbered so they stay distinct."""
    first = traces[0]
    for t in traces[1:]:
        if t.fingerprint != first.fingerprint:
            raise MoeTierError(t.source, f"fingerprint {t.fingerprint[:16]} differs from {first.fingerprint[:16]} "
                               f"({first.source}): traces of different models cannot be merged")
        if (t.n_expert, t.n_expert_used) != (first.n_expert, first.n_expert_used) or \
                not np.array_equal(t.moe_layers, first.moe_layers):
            raise MoeTierError(t.source, "layer/expert layout differs from the first trace")
    sequences, offset = [], 0
    for t in traces:
        _, renumbered = np.unique(t.sequence, return_inverse=True)
        sequences.append(renumbered.astype(np.int32) + offset)
        offset += int(renumbered.max()) + 1 if t.n_tokens else 0
    cat = {k: np.concatenate([getattr(t, k) for t in traces]) for k in ARRAYS if k not in ("moe_layers", "sequence")}
    engines = sorted({t.engine for t in traces})
    return replace(first, sequence=np.concatenate(sequences), engine="+".join(engines), source=None, **cat)


def check_same_model(a: Trace, b: Trace) -> None:
    """Traces fitted on one model and scored on another would mean nothing."""
    if a.fingerprint != b.fingerprint:
        raise MoeTierError(b.source, f"recorded on model {b.fingerprint[:16]}, but {a.source} on {a.fingerprint[:16]}")


def check_model(trace: Trace, fingerprint: str, model_path: str | Path) -> None:
    """A trace replayed against a model must come from that model."""
    if trace.fingerprint != fingerprint:
        raise MoeTierError(trace.source, f"trace was recorded on model {trace.fingerprint[:16]}, "
                           f"not {Path(model_path).name} ({fingerprint[:16]})")
