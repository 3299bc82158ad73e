"""One file's edit with its original kept once as `<file>.orig`: write, check and restore, byte for byte.

Every patch (Megatron source or config.json) is a `BackedUpPatch` that supplies `transform`; the
revert policy (refuse a file changed since, unless forced) and the symlink handling live here once.
"""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

from atomicio import atomic_write_bytes, fsync_dir
from patcher.states import PatchError, ReadOnlyTargetError

BACKUP_SUFFIX = ".orig"


def ensure_writable(path: Path) -> None:
    """Refuse a file whose mode has no write bit, even for root, before anything is written.

    A symlink passes: an atomic write replaces the link itself and never writes its target.
    """
    if not path.is_symlink() and path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ReadOnlyTargetError(
            f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):o}); "
            f"make it writable (chmod u+w '{path}') or patch a copy of it"
        )


def unified_diff(before: str, after: str, path: Path) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchError(f"{path}: not a UTF-8 text file (byte {exc.start}); give the path of a source or config file") from exc
    except OSError as exc:
        raise PatchError(f"{path}: cannot read ({exc.strerror})") from exc


class BackedUpPatch:
    """One file's edit; the original is kept once as `<file>.orig` for an exact revert.

    A file that is a symlink (Hugging Face hub snapshots link into blobs/) is never written
    through: the link itself becomes `<file>.orig` and a regular file takes its place, so the blob
    stays intact and `revert` puts the link back.
    """

    name = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    def has_backup(self) -> bool:
        return os.path.lexists(self.backup_path)

    def transform(self, text: str) -> str:
        raise NotImplementedError

    def is_own_result(self, original: str, current: str) -> bool:
        """Whether `current` is what this patch makes of `original`."""
        return self.transform(original) == current

    def original_text(self) -> str:
        """The file as shipped: the backup if this patch made one, else the file itself."""
        return read_text(self.backup_path if self.has_backup() else self.path)

    def applied_here(self) -> bool:
        return self.has_backup() and self.is_own_result(read_text(self.backup_path), read_text(self.path))

    def planned_change(self) -> tuple[str, str]:
        before = read_text(self.path)
        return before, self.transform(before)

    def write(self, before: str, after: str) -> None:
        ensure_writable(self.path)
        mode = self.path.stat().st_mode & 0o7777
        backup = self.backup_path
        if self.path.is_symlink():
            _replace_with_link(backup, os.readlink(self.path))
        elif not backup.exists() or backup.read_bytes() != before.encode("utf-8"):
            atomic_write_bytes(backup, before.encode("utf-8"), mode)
        atomic_write_bytes(self.path, after.encode("utf-8"), mode)

    def check_revert(self, force: bool) -> tuple[str, str] | None:
        """(current, original) texts if a revert may proceed, None without a backup; raises if refused."""
        if not self.has_backup():
            return None
        current = read_text(self.path)
        original = read_text(self.backup_path)
        if current != original and not self.is_own_result(original, current) and not force:
            raise PatchError(
                f"{self.path} changed since it was patched (it is neither the original in {self.backup_path.name} "
                "nor the patched form of it); nothing restored. Re-run with --force to restore "
                f"{self.backup_path.name} anyway, or delete {self.backup_path.name} to keep the current file"
            )
        return current, original

    def restore(self) -> None:
        backup = self.backup_path
        if backup.is_symlink():
            os.replace(backup, self.path)
            fsync_dir(self.path.parent)
            return
        atomic_write_bytes(self.path, backup.read_bytes(), backup.stat().st_mode & 0o7777)
        backup.unlink()


def _replace_with_link(path: Path, target: str) -> None:
    temporary = path.with_name(f".{path.name}.link.tmp")
    if os.path.lexists(temporary):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, path)
    fsync_dir(path.parent)
