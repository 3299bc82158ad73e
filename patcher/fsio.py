"""Atomic file writes shared by every command that touches a user's files."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class ReadOnlyTargetError(OSError):
    """The file (or its directory) cannot be written; the message says what to do."""


def ensure_writable(path: Path) -> None:
    """Refuse a file whose mode has no write bit, even for root, before anything is written.

    A symlink passes: an atomic write replaces the link itself and never writes its target.
    """
    if not path.is_symlink() and path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ReadOnlyTargetError(
            f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):o}); "
            f"make it writable (chmod u+w '{path}') or patch a copy of it"
        )


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` through a temp file in the same directory: fsync, then os.replace.

    The file mode of an existing `path` is kept unless `mode` is given. A reader sees either the
    old bytes or the new ones, never a half-written file.
    """
    path = Path(path)
    ensure_writable(path)
    if mode is None:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ReadOnlyTargetError(
            f"cannot create a file in {path.parent} ({exc.strerror}); "
            "make the directory writable or work on a copy"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
