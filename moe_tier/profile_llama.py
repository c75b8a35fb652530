"""Record llama.cpp's routing through llama-cpp-python's eval callback, into a moe-tier trace recorder.

llama.cpp names the tensors of its MoE block per layer (src/llama-graph.cpp, build_moe_ffn):
`ffn_moe_topk-N` (I32, ne = [K, T], a view into the argsort) holds the chosen experts, and the gate weights
pass through `ffn_moe_weights-N` (F32, [1, K, T]) and, depending on the architecture, `_softmax`, `_norm`
and `_scaled` variants; the last of these in that order is what the layer multiplies by.
The model runs on the CPU backend (n_gpu_layers=0), so the callback reads tensors straight from host memory,
and every token requests logits so the last layer routes every token rather than only the last one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np

from moe_tier.errors import MoeTierError
from moe_tier.reader import open_model
from router_predict.recorder import TraceRecorder
from router_predict.trace import Trace

TOPK = "ffn_moe_topk"
WEIGHT_STAGES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
DTYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.I32: np.int32}


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def tensor_array(t: GgmlTensor) -> np.ndarray:
    """A copy of a host tensor's data, honouring its strides; shape (ne[3], ne[2], ne[1], ne[0])."""
    dtype = np.dtype(DTYPES[gguf.GGMLQuantizationType(t.type)])
    ne, nb = list(t.ne), list(t.nb)
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + dtype.itemsize
    base = np.frombuffer((ctypes.c_uint8 * span).from_address(t.data), dtype=np.uint8)
    view = np.lib.stride_tricks.as_strided(base.view(dtype) if span % dtype.itemsize == 0 else base[:0].view(dtype),
                                           shape=ne[::-1], strides=nb[::-1])
    return view.copy()


def _split_name(name: str) -> tuple[str, int] | None:
    stem, _, layer = name.rpartition("-")
    return (stem, int(layer)) if layer.isdigit() else None


class _Tap:
    """The eval callback: asks for the routing tensors, hands each layer's final routing to the recorder."""

    def __init__(self, recorder: TraceRecorder):
        self.recorder = recorder
        self.topk: dict[int, np.ndarray] = {}
        self.weights: dict[int, tuple[int, np.ndarray]] = {}

    def __call__(self, tensor_p, ask, _user_data) -> bool:
        t = ctypes.cast(tensor_p, ctypes.POINTER(GgmlTensor)).contents
        parsed = _split_name(t.name.decode(errors="replace"))
        if parsed is None or (parsed[0] != TOPK and parsed[0] not in WEIGHT_STAGES):
            return not ask  # ask: not interested; otherwise: keep computing
        if ask:
            return True
        stem, layer = parsed
        arr = tensor_array(t)
        if stem == TOPK:
            self.topk[layer] = arr.reshape(-1, arr.shape[-1])  # (T, K)
        else:
            stage = WEIGHT_STAGES.index(stem)
            if stage >= self.weights.get(layer, (-1, None))[0]:
                self.weights[layer] = (stage, arr.reshape(self.topk[layer].shape))
        return True

    def flush(self) -> None:
        """After a decode call: every layer's experts and final weights, in layer order."""
        for layer in sorted(self.topk):
            self.recorder.record(layer, self.topk[layer], self.weights[layer][1])
        self.topk, self.weights = {}, {}


def profile_llama(model_path: str | Path, prompts: Iterable[str], max_tokens: int, n_threads: int = 2) -> Trace:
    """Greedy generation of `max_tokens` per prompt in llama.cpp, recording every token's routing."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    from llama_cpp._utils import suppress_stdout_stderr

    desc = open_model(model_path)
    c = desc.config
    recorder = TraceRecorder(fingerprint=desc.fingerprint, arch=desc.arch, n_layer=c.n_layer, n_expert=c.n_expert,
                             n_expert_used=c.n_expert_used, moe_layers=desc.moe_layers, engine="llama.cpp")
    tap = _Tap(recorder)
    callback = llama_cpp.ggml_backend_sched_eval_callback(tap)  # kept referenced while the context lives
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every context it builds and frees
        return _generate(LlamaModel(path_model=str(model_path), params=mparams, verbose=False), recorder, tap,
                         callback, prompts, max_tokens, n_threads, model_path)


def _generate(model, recorder: TraceRecorder, tap: _Tap, callback, prompts, max_tokens, n_threads, model_path):
    import llama_cpp
    from llama_cpp._internals import LlamaBatch, LlamaContext

    try:
        prompts = list(prompts)
        token_lists = [model.tokenize(p.encode(), add_bos=True, special=False) for p in prompts]
        n_ctx = max(len(t) for t in token_lists) + max_tokens
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = LlamaContext(model=model, params=cparams, verbose=False)
        batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        n_vocab = model.n_vocab()
        for tokens in token_lists:
            if not tokens:
                raise MoeTierError(model_path, "empty prompt")
            ctx.kv_cache_clear()
            recorder.begin_sequence(tokens)
            batch.set_batch(tokens, n_past=0, logits_all=True)
            ctx.decode(batch)
            tap.flush()
            n_past = len(tokens)
            for n in range(max_tokens):  # the loop of moe-tier's Engine.generate_tokens, step for step
                logits = np.ctypeslib.as_array(ctx.get_logits_ith(batch.n_tokens() - 1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                if llama_cpp.llama_vocab_is_eog(model.vocab, token):
                    break
                recorder.generated(token)
                if n + 1 < max_tokens:
                    batch.set_batch([token], n_past=n_past, logits_all=True)
                    n_past += 1
                    ctx.decode(batch)
                    tap.flush()
        return recorder.trace()
    finally:
        model.close()
