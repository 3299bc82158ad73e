"""--overwrite over another source's output: nothing already there may pass for this conversion's.

DeepSeek-V3 and R1 share every tensor name and shape, so another source's shards or bins have the
very same sizes and headers as ours; a converter that reused them would silently mix two models.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from converters.testing import make_fp8_checkpoint


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters.cli", *args, "--quiet"], capture_output=True, text=True)


def tree(path: Path, pattern: str = "*") -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two FP8 checkpoints of one architecture with different weights (as V3 and R1 are)."""
    root = tmp_path_factory.mktemp("two-sources")
    make_fp8_checkpoint(root / "a", seed=0, shards=2)
    make_fp8_checkpoint(root / "b", seed=1, shards=2)
    return {"a": root / "a", "b": root / "b", "root": root}


def test_fp8_bf16_finished_output_of_another_source_is_never_complete(sources, tmp_path):
    dst, fresh = tmp_path / "dst", tmp_path / "fresh"
    assert convert("fp8-bf16", "--src", str(sources["a"]), "--dst", str(dst)).returncode == 0
    before = tree(dst)
    refused = convert("fp8-bf16", "--src", str(sources["b"]), "--dst", str(dst))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert tree(dst) == before  # refused: left as found
    assert convert("fp8-bf16", "--src", str(sources["b"]), "--dst", str(dst), "--overwrite").returncode == 0
    assert convert("fp8-bf16", "--src", str(sources["b"]), "--dst", str(fresh)).returncode == 0
    assert tree(dst, "*.safetensors") and tree(dst, "*.safetensors") == tree(fresh, "*.safetensors")
    assert tree(dst, "*.safetensors") != {k: v for k, v in before.items() if k.endswith(".safetensors")}
    again = convert("fp8-bf16", "--src", str(sources["b"]), "--dst", str(dst), "--json")
    assert again.returncode == 0 and '"finalized": true' in again.stdout  # its own finished output: complete


def test_hf_mcore_unfinished_bins_of_another_source_are_rewritten(sources, tmp_path):
    dst, fresh = tmp_path / "dst", tmp_path / "fresh"
    # an unfinished conversion of A: one part of two written, no .metadata yet
    part = convert("hf-mcore", "--src", str(sources["a"]), "--dst", str(dst), "--shard", "0/2", "--bin-mb", "1")
    assert part.returncode == 1, part.stderr
    assert list((dst / "release").glob("__*_0.distcp"))
    assert convert("hf-mcore", "--src", str(sources["b"]), "--dst", str(dst), "--bin-mb", "1", "--overwrite").returncode == 0
    assert convert("hf-mcore", "--src", str(sources["b"]), "--dst", str(fresh), "--bin-mb", "1").returncode == 0
    assert tree(dst / "release", "*.distcp") == tree(fresh / "release", "*.distcp")
