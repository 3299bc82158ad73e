"""Atomic file writes for every command that writes a user's files (patcher and converters alike).

A reader of the target sees the old bytes or the new ones, never a half-written file, and a
finished write survives a power cut: temp file in the target's filesystem, fsync, rename, fsync of
the directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


class AtomicFile:
    """A file written under a temp name and renamed into place by `commit`.

    The temp file sits beside the target unless `tmp_path` names another place on the same
    filesystem (a converter's state dir, so that an interrupted part can be found and removed).
    Used as a context manager it commits on success and discards on any exception; `close` and
    `commit` may also be called apart, so the fsync can run in another thread than the writing.
    """

    def __init__(self, path: Path, tmp_path: Path | None = None, mode: int | None = None) -> None:
        self.path = Path(path)
        if mode is None:
            mode = stat.S_IMODE(self.path.stat().st_mode) if self.path.exists() else 0o644
        self.mode = mode
        if tmp_path is None:
            fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            self.tmp_path = Path(name)
            self.handle: BinaryIO = os.fdopen(fd, "wb")
        else:
            self.tmp_path = Path(tmp_path)
            self.handle = open(self.tmp_path, "wb")  # noqa: SIM115 - closed by close/commit/discard

    def write(self, data: bytes | memoryview) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self._raise_named(exc)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the temp file (a writer that fills a layout out of order)."""
        view = memoryview(data).cast("B")
        try:
            self.handle.flush()
            done = 0
            while done < len(view):
                done += os.pwrite(self.handle.fileno(), view[done:], offset + done)
        except OSError as exc:
            self._raise_named(exc)

    def close(self) -> None:
        if not self.handle.closed:
            try:
                self.handle.close()
            except OSError as exc:
                self._raise_named(exc)

    def _raise_named(self, exc: OSError) -> None:
        """A write error names no file; say which one (the target: the temp name means nothing to people)."""
        if exc.filename:
            raise exc
        raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def commit(self, expected_size: int | None = None) -> None:
        """fsync the data, check its size, rename it over the target and fsync the directory."""
        try:
            if not self.handle.closed:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
            else:
                fd = os.open(self.tmp_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            size = self.tmp_path.stat().st_size
            if expected_size is not None and size != expected_size:
                raise OSError(errno.EIO, f"wrote {size} bytes, expected {expected_size}", str(self.path))
            os.chmod(self.tmp_path, self.mode)
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.discard()
            self._raise_named(exc)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        try:
            self.handle.close()
        except OSError:  # the data is being thrown away: a failed flush does not matter
            pass
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically; an existing file's mode is kept unless `mode` is given."""
    with AtomicFile(path, mode=mode) as target:
        target.write(data)


def atomic_copy(source: Path, target: Path) -> None:
    """Copy a file's bytes, mode and times to `target` atomically (parent dirs created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, AtomicFile(target, mode=stat.S_IMODE(os.stat(source).st_mode)) as writer:
        shutil.copyfileobj(reader, writer.handle, 16 * 1024 * 1024)
        writer.handle.flush()
        shutil.copystat(source, writer.tmp_path)


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
