"""Shared pytest fixtures: released megatron-core files that `patcher` edits, fetched once into a cache."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEEL_CACHE = Path(os.environ.get("MCORE_WHEEL_CACHE", REPO / ".cache" / "mcore-wheels"))
SPEC_IN_WHEEL = "megatron/core/models/gpt/gpt_layer_specs.py"
PACKAGE_INFO_IN_WHEEL = "megatron/core/package_info.py"
PATCHED_IN_WHEEL = (
    SPEC_IN_WHEEL,
    PACKAGE_INFO_IN_WHEEL,
    "megatron/core/extensions/transformer_engine.py",
    "megatron/core/transformer/multi_latent_attention.py",
    "megatron/core/transformer/mla_qk_norm_config.py",  # megatron-core 0.19+ only
)


def fetch_mcore_wheel(version: str) -> Path:
    """`pip download --no-deps megatron-core==VERSION` into the cache (cp312 wheels for releases without cp311)."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    # `make test` runs several pytest workers: one downloads a release while the others wait for it
    with open(WHEEL_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(version)


def _fetch_locked(version: str) -> Path:
    cached = sorted(WHEEL_CACHE.glob(f"megatron_core-{version}-*.whl"))
    if cached:
        return cached[0]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(WHEEL_CACHE), f"megatron-core=={version}"]
    attempts = [base, [*base, "--only-binary=:all:", "--python-version", "3.12"]]
    errors = []
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True)
        cached = sorted(WHEEL_CACHE.glob(f"megatron_core-{version}-*.whl"))
        if cached:
            return cached[0]
        errors.append(result.stderr.strip().splitlines()[-1:] or [""])
    pytest.fail(f"could not download megatron-core=={version}: {errors}")


@pytest.fixture(scope="session")
def mcore_release(tmp_path_factory):
    """Factory: VERSION -> a fresh scratch `site-packages` dir holding that release's patched files and package_info."""

    def extract(version: str) -> Path:
        wheel = fetch_mcore_wheel(version)
        target = tmp_path_factory.mktemp(f"mcore-{version}")
        with zipfile.ZipFile(wheel) as archive:
            for member in PATCHED_IN_WHEEL:
                if member not in archive.namelist():  # a file newer releases added
                    continue
                out = target / member
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(member))
        return target

    return extract


@pytest.fixture
def tmpfs(tmp_path):
    """SIZE -> a fresh tmpfs of that size (needs the right to mount: skipped with the reason otherwise)."""
    mounted = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"tmpfs-{len(mounted)}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny DeepSeek-V3 of converters.testing in FP8 (3 shards) and its BF16 cast by `convert fp8-bf16`,
    made once per test worker and shared by the converter tests: read them, never write into them."""
    from convert_cli import convert

    from converters.testing import make_fp8_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    make_fp8_checkpoint(root / "fp8", shards=3)
    result = convert("fp8-bf16", "--src", str(root / "fp8"), "--dst", str(root / "bf16"))
    assert result.returncode == 0, result.stderr
    return {"fp8": root / "fp8", "bf16": root / "bf16"}



def pytest_collection_modifyitems(items):
    """The Ray cluster tests first: they mostly wait for processes to start, so under `make test`'s
    workers they overlap the CPU-bound converter tests instead of running alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_cluster.py")
