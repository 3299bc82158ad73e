"""`convert` run as users run it (a subprocess), for the converter tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def convert(*args: str, quiet: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`convert ARGS` (with --quiet unless quiet=False), its output captured as text; kwargs go to subprocess.run."""
    return subprocess.run([sys.executable, "-m", "converters.cli", *args, *(["--quiet"] if quiet else [])],
                          capture_output=True, text=True, **kwargs)


def to_mcore(src: Path, dst: Path, *extra: str) -> Path:
    """`convert hf-mcore` into dst; the dist_checkpointing_path (dst/release)."""
    result = convert("hf-mcore", "--src", str(src), "--dst", str(dst), *extra)
    assert result.returncode == 0, result.stderr
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "release"
    return dst / "release"
