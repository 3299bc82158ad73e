"""bench.mla_tp_grads on CPU with the installed megatron-core (0.16.1, local spec, gloo): the rope gradient.

The local spec builds column-parallel q/kv down projections, the layout the how-to's edit gives the TE
spec, so it carries Megatron-LM #1699. Measured on this machine (max over parameters of
max |g_tp2 - g_tp1| / max |g_tp1|, fp32):
  unpatched:        linear_kv_down_proj 1.8e-2, linear_q_down_proj 2.3e-3, input_layernorm 1.6e-2
  rope fix applied: every parameter <= 6.2e-7 (fp32 summation-order noise; the loss is bit-identical)
TOLERANCE sits ~16x above that noise; MISMATCH 100x above TOLERANCE and below the smallest unpatched
down-projection error, so each assertion fails if the other state is what was measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patcher.targets import installed_megatron_root

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
MISMATCH = 1e-3


def run_bench(*path_first: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path_first), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "bench.mla_tp_grads", "--backend", "local", "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def unpatched() -> dict:
    return run_bench()


@pytest.fixture(scope="module")
def rope_fixed(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(installed_megatron_root(), site / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    patch = subprocess.run(
        [sys.executable, "-m", "patcher.cli", "apply", "--rope-fix", str(site)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert patch.returncode == 0, patch.stderr
    assert "rope-gradient" in patch.stdout
    return run_bench(site)


def test_without_the_rope_fix_tp2_gradients_are_wrong(unpatched):
    assert unpatched["megatron"]["rope_gradient_fix"] is False
    assert unpatched["tp2"]["layers"] == {"linear_q_down_proj": "ColumnParallelLinear", "linear_kv_down_proj": "ColumnParallelLinear"}
    assert unpatched["loss"]["rel_diff"] < TOLERANCE  # the forward is right; only the backward misses heads
    worst = unpatched["max_rel_diff"]
    assert worst["linear_kv_down_proj"] > MISMATCH and worst["linear_q_down_proj"] > MISMATCH
    assert worst["input_layernorm"] > MISMATCH  # the wrong input gradient reaches every earlier layer
    assert worst["output_layer"] < TOLERANCE  # nothing after the attention is affected


def test_with_the_rope_fix_tp2_gradients_equal_tp1(rope_fixed):
    assert rope_fixed["megatron"]["rope_gradient_fix"] is True
    assert Path(rope_fixed["megatron"]["path"]) != installed_megatron_root() / "core"  # the patched copy ran
    assert rope_fixed["loss"]["rel_diff"] < TOLERANCE
    assert rope_fixed["max_rel_diff_all"] < TOLERANCE, rope_fixed["max_rel_diff"]
    assert len(rope_fixed["grads"]) == 2 * 11 + 3  # every parameter: 11 per layer, embedding, final norm, output layer


def test_flag_based_export_gives_hf_shapes(unpatched, rope_fixed):
    """verl's per-tensor gather (by tensor_model_parallel / partition_dim) of column-parallel down projections."""
    for report in (unpatched, rope_fixed):
        export = report["export_down_proj"]
        assert len(export) == 4 and report["export_ok"]
        for name, entry in export.items():
            assert entry["tensor_model_parallel"] is True
            assert entry["shape"] == ([48, 64] if "linear_q_down_proj" in name else [32 + 16, 64])
        assert report["export_mismatched"] == {}
