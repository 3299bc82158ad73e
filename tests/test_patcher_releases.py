"""patcher against the real gpt_layer_specs.py of released megatron-core wheels (fetched once, cached)."""

from __future__ import annotations

import difflib
import json

import pytest

from patcher.cli import main
from patcher.patches import resolve

pytestmark = pytest.mark.network

# version -> (state before, functions whose down projections get patched, sites patched)
RELEASES = {
    "0.12.3": ("not-needed", set(), 0),  # class form, already TEColumnParallelLinear
    "0.13.1": ("not-needed", set(), 0),  # backend.column_parallel_linear()
    "0.14.0": ("needs-patch", {"get_gpt_layer_with_transformer_engine_spec"}, 2),
    "0.15.3": ("needs-patch", {"get_gpt_layer_with_transformer_engine_spec"}, 2),
    "0.16.1": ("needs-patch", {"get_gpt_layer_with_transformer_engine_spec", "get_gpt_layer_with_inference_spec"}, 4),
    # newest: builders renamed to *_submodules, plus an optional fused q/kv down projection
    "0.19.2": (
        "needs-patch",
        {"get_gpt_layer_with_transformer_engine_submodules", "get_gpt_layer_with_inference_submodules"},
        4,
    ),
}


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.mark.parametrize("version", sorted(RELEASES))
def test_release(version, mcore_release, capsys):
    site = mcore_release(version)
    state, functions, count = RELEASES[version]
    spec = site / "megatron/core/models/gpt/gpt_layer_specs.py"
    original = spec.read_bytes()

    assert main(["status", "--json", str(site)]) == (1 if state == "needs-patch" else 0)
    status = json.loads(capsys.readouterr().out)
    assert status["version"] == version
    assert status["state"] == state
    needing = [s for s in status["sites"] if s["state"] == "needs-patch"]
    assert len(needing) == count
    assert {s["function"] for s in needing} == functions
    assert all(s["expression"] == "backend.linear()" for s in needing)

    assert main(["apply", str(site)]) == 0
    after = spec.read_text()
    if state == "not-needed":
        assert spec.read_bytes() == original
        assert not (spec.parent / "gpt_layer_specs.py.orig").exists()
        return
    changes = changed_lines(original.decode(), after)
    assert len(changes) == 2 * count
    assert all("down_proj=backend." in line for line in changes)
    assert sorted(line[1:].replace("column_parallel_linear", "linear") for line in changes if line[0] == "+") == sorted(
        line[1:] for line in changes if line[0] == "-"
    )
    assert resolve(site).detect().state == "applied"

    assert main(["revert", str(site)]) == 0
    assert spec.read_bytes() == original


def test_newest_release_fused_site_is_recognised(mcore_release, capsys):
    site = mcore_release("0.19.2")
    assert main(["status", "--json", str(site)]) == 1
    sites = json.loads(capsys.readouterr().out)["sites"]
    fused = [s for s in sites if s["argument"] == "linear_qkv_down_proj"]
    assert len(fused) == 1
    assert fused[0]["state"] == "fused-column-parallel"
    assert fused[0]["function"] == "get_gpt_layer_with_transformer_engine_submodules"
