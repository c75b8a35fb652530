"""Byte sizes as people type them (12GiB, 500MB, 1.5G) and as reports print them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """'12GiB' -> 12884901888. Bare G/M/K are binary, as in llama.cpp and nvidia-smi."""
    m = _SIZE.match(text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 12GiB, 500MB, 24G)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bytes_list(text: str) -> list[int]:
    """'12GiB' or '12GiB,24GiB' (one budget per GPU)."""
    return [parse_bytes(part) for part in text.split(",")]


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
