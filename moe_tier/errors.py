"""User-facing errors: one line naming the file and the problem, exit status 2."""

from __future__ import annotations

from pathlib import Path


class MoeTierError(Exception):
    """Bad input from the user. The CLI prints `str(err)` on one line and exits 2."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem
