"""atomicio: a write lands whole or not at all, keeps modes, and names the target when the disk is full."""

from __future__ import annotations

import errno
import os

import pytest
from faults import fill

from atomicio import AtomicFile, atomic_copy, atomic_write_bytes


def test_write_replaces_whole_and_keeps_the_mode(tmp_path):
    target = tmp_path / "config.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o640"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left


def test_an_exception_inside_leaves_the_old_file(tmp_path):
    target = tmp_path / "shard.safetensors"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError), AtomicFile(target) as out:
        out.write(b"half")
        raise RuntimeError("killed midway")
    assert target.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]


def test_commit_checks_the_size_and_renames_from_another_temp_dir(tmp_path):
    (tmp_path / "state").mkdir()
    out = AtomicFile(tmp_path / "a.bin", tmp_path / "state" / "a.bin~host~1.tmp")
    out.write(b"12345")
    out.close()
    with pytest.raises(OSError, match="wrote 5 bytes, expected 6") as caught:
        out.commit(expected_size=6)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp_path / "a.bin")
    assert not (tmp_path / "a.bin").exists() and list((tmp_path / "state").iterdir()) == []
    out = AtomicFile(tmp_path / "a.bin", tmp_path / "state" / "a.bin~host~1.tmp")
    out.write(b"123456")
    out.close()
    out.commit(expected_size=6)
    assert (tmp_path / "a.bin").read_bytes() == b"123456"


def test_copy_keeps_bytes_mode_and_times(tmp_path):
    source = tmp_path / "tokenizer.json"
    source.write_bytes(os.urandom(3000))
    os.chmod(source, 0o444)
    os.utime(source, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    target = tmp_path / "out" / "tokenizer.json"
    atomic_copy(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_mode == source.stat().st_mode and target.stat().st_mtime_ns == source.stat().st_mtime_ns
    atomic_copy(source, target)  # again over the read-only copy, as a resumed finalize does
    assert target.read_bytes() == source.read_bytes()


def test_disk_full_names_the_target_and_leaves_nothing(tmpfs):
    mount_point = tmpfs("2m")
    target = mount_point / "model-00001.safetensors"
    target.write_bytes(b"previous")
    ballast = fill(mount_point)
    with pytest.raises(OSError) as caught, AtomicFile(target) as out:
        for _ in range(64):
            out.write(b"\1" * 65536)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in mount_point.iterdir()) == ["ballast", "model-00001.safetensors"]
    ballast.unlink()
