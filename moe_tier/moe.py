"""The MoE block, shared by every architecture: route, fetch experts, grouped matmuls, weighted sum.

Shape key: T tokens, D embedding width, E experts, k experts used per token, F expert FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moe_tier.config import Gating
from moe_tier.kernels.activations import Activations
from moe_tier.layers import silu
from moe_tier.reader import ExpertId
from moe_tier.tensors import QTensor

MIN_WEIGHT_SUM = 6.103515625e-5  # llama.cpp clamps the renormalising sum to this


@dataclass(frozen=True)
class Routing:
    ids: np.ndarray  # (T, k) int32, best first; a GPU backend's decode keeps both on the device
    weights: np.ndarray  # (T, k) float32

    def host(self) -> Routing:
        """The same routing as numpy arrays (a device-side routing is read back: a host round trip)."""
        if isinstance(self.ids, np.ndarray):
            return self
        return Routing(self.ids.cpu().numpy().astype(np.int32), self.weights.float().cpu().numpy())


def route(
    logits: np.ndarray,
    k: int,
    gating: Gating,
    weights_norm: bool,
    weights_scale: float = 1.0,
    selection_bias: np.ndarray | None = None,
) -> Routing:
    """Router logits (T, E) -> the k experts per token and their weights, as llama.cpp's build_moe_ffn."""
    if gating is Gating.SOFTMAX:
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
    elif gating is Gating.SIGMOID:
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        probs = logits
    selection = probs if selection_bias is None else probs + selection_bias
    ids = np.argsort(-selection, axis=1, kind="stable")[:, :k].astype(np.int32)
    weights = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    if gating is Gating.SOFTMAX_WEIGHT:
        z = np.exp(weights - weights.max(axis=1, keepdims=True))
        weights = z / z.sum(axis=1, keepdims=True)
    if weights_norm:
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), MIN_WEIGHT_SUM)
    if weights_scale not in (0.0, 1.0):
        weights = weights * np.float32(weights_scale)
    return Routing(ids, weights.astype(np.float32))


@dataclass(frozen=True)
class ExpertWeights:
    gate: QTensor  # (F, D)
    up: QTensor  # (F, D)
    down: QTensor  # (D, F)


class ExpertSource(Protocol):
    """Where a layer's experts come from: the file, a RAM tier, GPU slots. Counts what it serves."""

    def expert(self, eid: ExpertId) -> ExpertWeights: ...


def swiglu_ffn(x: np.ndarray | Activations, gate: QTensor, up: QTensor, down: QTensor) -> np.ndarray:
    """down(silu(gate x) * up x): every expert and shared expert, (T, D) -> (T, D)."""
    return down @ (silu(gate @ x) * (up @ x))


def moe_ffn(x: np.ndarray, routing: Routing, layer: int, experts: ExpertSource) -> np.ndarray:
    """Each selected expert runs once on all the tokens that chose it, so its weights are read once; x is
    quantized once for the gate and up matrices of every expert."""
    acts = Activations(x)
    T, k = routing.ids.shape
    if T == 1:  # decode: k distinct experts, no grouping to do
        out = None
        for slot, e in enumerate(routing.ids[0].tolist()):
            w = experts.expert(ExpertId(layer, e))
            y = swiglu_ffn(acts, w.gate, w.up, w.down) * routing.weights[0, slot]
            out = y if out is None else out + y  # in slot order, as below
        return out
    per_slot = np.zeros((k, T, x.shape[1]), dtype=np.float32)
    for e in np.unique(routing.ids):
        tok, slot = np.nonzero(routing.ids == e)
        w = experts.expert(ExpertId(layer, int(e)))
        y = swiglu_ffn(acts.rows(tok), w.gate, w.up, w.down)
        per_slot[slot, tok] = y * routing.weights[tok, slot][:, None]
    return per_slot.sum(axis=0)  # llama.cpp adds the k weighted outputs in slot order
