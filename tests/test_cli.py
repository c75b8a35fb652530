"""The `moe-tier` command as a user runs it: JSON shape, text output, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe_tier.synth import tiny


def moe_tier(*args, check=False):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_inspect_json_has_the_stable_keys(synth_model, arch):
    path = synth_model(arch, qtype="Q4_K")
    out = moe_tier("inspect", path, "--vram", "12GiB", "--json", check=True)
    report = json.loads(out.stdout)
    for key in ("arch", "n_layer", "n_expert", "n_expert_used", "bytes", "experts", "plan"):
        assert key in report
    spec = tiny(arch)
    assert (report["arch"], report["n_layer"], report["n_expert"]) == (arch, spec.n_layer, spec.n_expert)
    assert set(report["bytes"]) == {"dense", "router", "shared", "routed"}
    assert len(report["experts"]) == spec.n_layer * spec.n_expert
    assert report["experts"][0]["qtypes"] == ["Q4_K"]
    plan = report["plan"]
    placed = plan["hot"] + plan["warm"] + plan["cold"]
    assert sorted(map(tuple, placed)) == sorted((e["layer"], e["expert"]) for e in report["experts"])
    assert len(plan["hot"]) == len(placed)  # a tiny model fits 12 GiB entirely


def test_inspect_rich_report(synth_model):
    out = moe_tier("inspect", synth_model("qwen3moe", qtype="Q4_K"), "--vram", "12GiB", check=True)
    for text in ("qwen3moe", "Bytes by category", "Tier plan", "routed", "hot"):
        assert text in out.stdout


def test_run_streams_text_and_summarises(synth_model):
    out = moe_tier("run", synth_model("qwen3moe", qtype="Q8_0"), "-p", "Hello", "-n", "8", check=True)
    assert out.stdout.startswith("Hello") and len(out.stdout) > len("Hello\n")
    assert "tok/s" in out.stderr and "weights read per token" in out.stderr


@pytest.mark.parametrize("args,problem", [
    (["inspect", "{missing}"], "no such file"),
    (["inspect", "{text}"], "not a GGUF file"),
    (["inspect", "{model}", "--vram", "12XB"], "not a size"),
    (["inspect", "{model}", "--vram", "1MiB"], "cannot hold the fixed part"),
    (["run", "{model}", "-p", "hi", "-n", "5000", "--ctx", "64"], "exceed the context"),
    (["run", "{model}", "-p", "hi", "--top-p", "0"], "bad sampling settings"),
])
def test_bad_input_is_one_line_and_exit_2(synth_model, tmp_path, args, problem):
    (tmp_path / "text.gguf").write_text("not a model")
    names = {"missing": tmp_path / "missing.gguf", "text": tmp_path / "text.gguf", "model": synth_model("llama")}
    out = moe_tier(*[a.format(**names) for a in args])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "Traceback" not in out.stderr
