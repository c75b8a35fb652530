"""Write one benchmark's results into its own section of BENCHMARKS.md, leaving the others alone."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the command to refresh it.\n"


def machine() -> str:
    """A one-line description of where this ran (CPU model, cores, GPU if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip().splitlines()
        if gpus:
            desc += ", " + ", ".join(gpus)
    except (OSError, subprocess.SubprocessError):
        pass
    return desc


def update_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section `name` with a dated block: machine, command, body."""
    today = datetime.date.today().isoformat()
    block = (
        f"<!-- section:{name} -->\n## {name}\n\n"
        f"- date: {today}\n- machine: {machine()}\n- command: `{command}`\n\n"
        f"{body.rstrip()}\n<!-- end:{name} -->\n"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    BENCHMARKS.write_text(text)
