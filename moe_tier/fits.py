"""Placements that worked, remembered per (model fingerprint, GPU name, runtime versions).

A fit found by shrinking the slot pool after an out-of-memory error is the starting point of
the next run on the same model, card and software, so the search is paid for once.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moe-tier" / "fits.json"


class FitStore:
    def __init__(self, path: Path | None = None):
        self.path = path or default_path()

    @staticmethod
    def key(fingerprint: str, gpu_name: str, runtime: str) -> str:
        return f"{fingerprint}|{gpu_name}|{runtime}"

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a missing or damaged cache only costs a new search

    def recall(self, fingerprint: str, gpu_name: str, runtime: str) -> dict | None:
        return self._load().get(self.key(fingerprint, gpu_name, runtime))

    def remember(self, fingerprint: str, gpu_name: str, runtime: str, record: dict) -> None:
        """Atomic replace, so a crash mid-write never leaves a half file."""
        data = self._load()
        data[self.key(fingerprint, gpu_name, runtime)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fits-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
