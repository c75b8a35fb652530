"""Import routing recorded elsewhere as JSON lines: one object per (sequence, token, layer).

Each line: {"problem_id": int, "token_idx": int, "layer": int, "experts": [int]*K, "gating_probs": [float]*K}
(the layout of the speculative-moe traces). Tokens missing any layer (a stream cut mid-token) are dropped,
since a cache replay needs every layer of a token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_tier.errors import MoeTierError
from router_predict.trace import Trace


def read_jsonl(path: str | Path, *, n_expert: int, fingerprint: str, arch: str, n_layer: int | None = None,
               is_prompt: bool = False) -> tuple[Trace, int]:
    """The trace and the number of incomplete tokens dropped."""
    rows: dict[tuple[int, int], dict[int, tuple[list, list]]] = {}
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                key = (int(r.get("problem_id", 0)), int(r["token_idx"]))
                rows.setdefault(key, {})[int(r["layer"])] = (r["experts"], r["gating_probs"])
    except FileNotFoundError:
        raise MoeTierError(path, "no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MoeTierError(path, f"line {lineno}: not a routing record ({err})") from None
    if not rows:
        raise MoeTierError(path, "no routing records")
    layers = sorted({layer for per in rows.values() for layer in per})
    complete = sorted(k for k, per in rows.items() if len(per) == len(layers))
    if not complete:
        raise MoeTierError(path, f"no token has all {len(layers)} layers")
    k = len(rows[complete[0]][layers[0]][0])
    ids = np.array([[rows[key][l][0] for l in layers] for key in complete], dtype=np.int16)
    weights = np.array([[rows[key][l][1] for l in layers] for key in complete], dtype=np.float32)
    n = len(complete)
    trace = Trace(
        fingerprint=fingerprint, arch=arch, engine="jsonl", n_layer=n_layer or max(layers) + 1,
        n_expert=n_expert, n_expert_used=k, moe_layers=np.array(layers, dtype=np.int32),
        expert_ids=ids, weights=weights, is_prompt=np.full(n, is_prompt),
        sequence=np.array([s for s, _ in complete], dtype=np.int32),
        position=np.array([t for _, t in complete], dtype=np.int32), token=np.full(n, -1, dtype=np.int32),
        source=str(path),
    )
    return trace, len(rows) - n
