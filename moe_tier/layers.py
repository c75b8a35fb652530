"""The dense building blocks, written to round where llama.cpp's CPU backend rounds.

Shape key: T tokens of one sequence, H query heads, Hkv key/value heads, d head dim,
L positions in the KV cache, D embedding width.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from moe_tier.config import RopeStyle
from moe_tier.kernels.activations import from_f16, to_f16


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., D) / rms(x) * weight; the mean is taken in float64 as ggml does (ggml_float sum)."""
    ms = np.square(x, dtype=np.float64).sum(axis=-1, keepdims=True) / x.shape[-1]  # np.mean's math, less overhead
    return (x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@lru_cache(maxsize=8)
def rope_angles(start: int, n: int, n_rot: int, base: float, freq_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T=n, n_rot/2) for positions start..start+n: theta_i = pos * base^(-2i/n_rot) by repeated float32
    products, as ggml. Cached: every layer of a step asks for the same positions (treat the arrays as read-only)."""
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_rot)
    steps = np.full((n, n_rot // 2), theta_scale, dtype=np.float32)
    steps[:, 0] = np.arange(start, start + n, dtype=np.float32)
    theta = np.cumprod(steps, axis=1, dtype=np.float32) * np.float32(freq_scale)
    return np.cos(theta), np.sin(theta)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: RopeStyle) -> np.ndarray:
    """Rotate the first n_rot dims of x (T, H, d). NORM pairs (2i, 2i+1); NEOX pairs (i, i + n_rot/2)."""
    half = cos.shape[1]
    out = 1 * x  # a copy, for numpy arrays and torch tensors alike
    c, s = cos[:, None, :], sin[:, None, :]
    if style is RopeStyle.NORM:
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = a * c - b * s
        out[..., 1 : 2 * half : 2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half : 2 * half]
        out[..., :half] = a * c - b * s
        out[..., half : 2 * half] = a * s + b * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, scale: float) -> np.ndarray:
    """Causal attention of T new queries at positions start.. over L cached keys.

    q (T, H, d) float32; k (L, Hkv, d) and v (L, Hkv, dv) float16 as in the KV cache.
    llama.cpp (without flash attention) multiplies f16 K by q converted to f16, and f16 V by
    the softmax converted to f16: the same roundings are applied here.
    """
    T, H, d = q.shape
    L, Hkv, dv = v.shape
    group = H // Hkv
    qg = to_f16(q).reshape(T, Hkv, group, d).transpose(1, 2, 0, 3).reshape(Hkv, group * T, d)
    scores = np.matmul(qg, from_f16(k).transpose(1, 2, 0)) * np.float32(scale)  # (Hkv, group*T, L)
    if T > 1:  # a single query (decode) is the last position: it sees every key
        qpos = np.tile(np.arange(start, start + T), group)  # row r of a group -> position
        scores[:, np.arange(L)[None, :] > qpos[:, None]] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.matmul(to_f16(probs), from_f16(v).transpose(1, 0, 2))  # (Hkv, group*T, dv)
    return out.reshape(Hkv, group, T, dv).transpose(2, 0, 1, 3).reshape(T, H * dv)


class KVCache:
    """One sequence's keys and values for every layer, f16 like llama.cpp's default cache.

    k (n_layer, ctx, Hkv, d) and v (n_layer, ctx, Hkv, dv): numpy arrays, or torch tensors on a GPU (with the
    layers on several GPUs, a list of each layer's (ctx, Hkv, d) tensor on its GPU)."""

    def __init__(self, k, v):
        self.k, self.v = k, v
        self.length = 0  # positions filled (the same for every layer once a forward pass completes)

    @classmethod
    def host(cls, n_layer: int, ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int) -> KVCache:
        return cls(np.zeros((n_layer, ctx, n_head_kv, head_dim_k), dtype=np.float16),
                   np.zeros((n_layer, ctx, n_head_kv, head_dim_v), dtype=np.float16))

    @property
    def ctx(self) -> int:
        return self.k[0].shape[0]

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write positions start..start+T of one layer; return that layer's keys/values so far."""
        end = start + len(k)
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v
        return self.k[layer][:end], self.v[layer][:end]
